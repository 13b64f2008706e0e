//! The E2B control plane as this daemon serves it, described as an OpenAPI 3.0 document at
//! `/e2b/openapi.json` (written here from what [`super::control`] does; E2B's own document describes more than
//! is served). Every error is `Error` (`{code, message}`); schemathesis runs against it in the tests.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::Shared;

fn error_responses(codes: &[(&str, &str)]) -> serde_json::Map<String, Value> {
    codes
        .iter()
        .map(|(code, why)| {
            (code.to_string(), json!({"description": why, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}))
        })
        .collect()
}

fn id_param() -> Value {
    json!({"name": "sandboxID", "in": "path", "required": true, "description": "Sandbox id (12 lowercase hex digits)", "schema": {"type": "string"}})
}

fn op(summary: &str, ok: (&str, Value), errors: &[(&str, &str)], params: Value, body: Option<Value>) -> Value {
    let mut responses = error_responses(errors);
    responses.insert(ok.0.to_string(), ok.1);
    let mut o = json!({"summary": summary, "parameters": params, "responses": responses, "security": [{"apiKey": []}]});
    if let (Some(b), Some(m)) = (body, o.as_object_mut()) {
        m.insert("requestBody".into(), json!({"required": true, "content": {"application/json": {"schema": b}}}));
    }
    o
}

fn json_of(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// The document; `templates` are the template names this daemon serves (any other is a 404).
pub fn document(templates: &[String]) -> Value {
    let auth = ("401", "No API key, or an unknown one");
    let missing = ("404", "No such sandbox for this key (another key's sandbox does not exist for it)");
    let bad = ("400", "A malformed body or parameter, or an option this daemon cannot give (named)");
    let list_params = json!([
        {"name": "metadata", "in": "query", "schema": {"type": "string"}, "description": "URL-encoded key=value pairs, all of which must match"},
        {"name": "state", "in": "query", "schema": {"type": "string"}, "description": "running, paused or both, comma-separated"},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
        {"name": "nextToken", "in": "query", "schema": {"type": "string"}, "description": "The x-next-token of the previous page"}
    ]);
    let listed = json!({"description": "The caller's sandboxes", "headers": {"x-next-token": {"description": "Present when there is a next page", "schema": {"type": "string"}}},
        "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/ListedSandbox"}}}}});
    let timeout_body = json!({"type": "object", "required": ["timeout"], "properties": {"timeout": {"type": "integer", "minimum": 0}}});
    let connect_body = json!({"type": "object", "properties": {"timeout": {"type": "integer", "minimum": 0}}});
    let refresh_body = json!({"type": "object", "properties": {"duration": {"type": "integer", "minimum": 0}}});
    let pause_body = json!({"type": "object", "properties": {"memory": {"type": "boolean"}, "requireHealthyGuest": {"type": "boolean"}}});
    let no_content = |d: &str| json!({"description": d});
    let sandbox = || json!({"$ref": "#/components/schemas/Sandbox"});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "hutch serve: E2B control plane", "version": env!("CARGO_PKG_VERSION"),
                 "description": "E2B's REST API as served by hutch serve for the stock E2B SDK; send the key as X-API-Key."},
        "paths": {
            "/v2/sandboxes": {
                "post": op("Create a sandbox", ("201", json_of("Created and running", sandbox())),
                    &[bad, auth, ("404", "Unknown template"), ("429", "At the daemon's cap or the key's quota"), ("503", "The daemon is shutting down")],
                    json!([]), Some(json!({"$ref": "#/components/schemas/NewSandbox"}))),
                "get": op("List sandboxes", ("200", listed.clone()), &[bad, auth], list_params.clone(), None),
            },
            "/sandboxes": {"get": op("List running sandboxes (older form)", ("200", listed), &[bad, auth], list_params, None)},
            "/sandboxes/{sandboxID}": {
                "get": op("A sandbox", ("200", json_of("The sandbox", json!({"$ref": "#/components/schemas/SandboxDetail"}))), &[auth, missing], json!([id_param()]), None),
                "delete": op("Kill a sandbox", ("204", no_content("Killed")), &[auth, missing], json!([id_param()]), None),
            },
            "/sandboxes/{sandboxID}/timeout": {
                "post": op("End the sandbox `timeout` seconds from now", ("204", no_content("Set")), &[bad, auth, missing], json!([id_param()]), Some(timeout_body)),
            },
            "/sandboxes/{sandboxID}/refreshes": {
                "post": op("Keep the sandbox alive at least `duration` more seconds", ("204", no_content("Extended")), &[bad, auth, missing], json!([id_param()]), Some(refresh_body)),
            },
            "/v2/sandboxes/{sandboxID}/connect": {
                "post": {
                    "summary": "Connect to a running sandbox (200) or resume a paused one (201)",
                    "parameters": [id_param()],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": connect_body}}},
                    "responses": {
                        "200": json_of("Running", sandbox()),
                        "201": json_of("Resumed", sandbox()),
                        "400": error_responses(&[bad])["400"],
                        "401": error_responses(&[auth])["401"],
                        "404": error_responses(&[missing])["404"],
                        "409": error_responses(&[("409", "It cannot be resumed now")])["409"],
                        "429": error_responses(&[("429", "At the daemon's cap or the key's quota")])["429"],
                    },
                    "security": [{"apiKey": []}],
                },
            },
            "/sandboxes/{sandboxID}/pause": {
                "post": op("Pause to disk (memory, devices, disk layer)", ("204", no_content("Paused")),
                    &[bad, auth, missing, ("409", "Not running (already paused, or starting)")], json!([id_param()]), Some(pause_body)),
            },
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": {
                "Error": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "integer"}, "message": {"type": "string"}}},
                "NewSandbox": {
                    "type": "object",
                    "required": ["templateID"],
                    "properties": {
                        "templateID": {"type": "string", "enum": templates, "description": "base/default, a served image or a --template alias"},
                        "timeout": {"type": "integer", "minimum": 1, "description": "Seconds to live (up to the daemon's --max-ttl)"},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        "envVars": {"type": "object", "additionalProperties": {"type": "string"}},
                        "autoPause": {"type": "boolean", "description": "Only false is served"},
                        "allow_internet_access": {"type": "boolean", "description": "true needs network.allowOut"},
                        "secure": {"type": "boolean"},
                        "network": {"$ref": "#/components/schemas/Network"},
                    },
                },
                "Network": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "allowOut": {"type": "array", "items": {"type": "string"}, "description": "Host names and *.domain wildcards"},
                        "denyOut": {"type": "array", "items": {"type": "string"}, "description": "Names win over allowOut; addresses are always denied"},
                        "rules": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "object", "properties": {
                            "transform": {"type": "object", "properties": {"headers": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}},
                        "dnsServers": {"type": "array", "items": {"type": "string"}},
                        "allowPublicTraffic": {"type": "boolean", "description": "Only false is served"},
                    },
                },
                "Sandbox": {
                    "type": "object",
                    "required": ["templateID", "sandboxID", "clientID", "envdVersion", "envdAccessToken", "trafficAccessToken"],
                    "properties": {
                        "templateID": {"type": "string"}, "sandboxID": {"type": "string"}, "clientID": {"type": "string"},
                        "envdVersion": {"type": "string"}, "envdAccessToken": {"type": "string"}, "trafficAccessToken": {"type": "string"},
                        "domain": {"type": "string", "nullable": true},
                    },
                },
                "ListedSandbox": {
                    "type": "object",
                    "required": ["templateID", "sandboxID", "clientID", "startedAt", "endAt", "cpuCount", "memoryMB", "diskSizeMB", "state", "envdVersion", "metadata"],
                    "properties": {
                        "templateID": {"type": "string"}, "sandboxID": {"type": "string"}, "clientID": {"type": "string"},
                        "startedAt": {"type": "string", "format": "date-time"}, "endAt": {"type": "string", "format": "date-time"},
                        "cpuCount": {"type": "integer"}, "memoryMB": {"type": "integer"}, "diskSizeMB": {"type": "integer"},
                        "state": {"type": "string", "enum": ["running", "paused"]}, "envdVersion": {"type": "string"},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
                "SandboxDetail": {"allOf": [{"$ref": "#/components/schemas/ListedSandbox"}, {"type": "object", "required": ["envdAccessToken"], "properties": {
                    "envdAccessToken": {"type": "string"}, "domain": {"type": "string", "nullable": true}}}]},
            },
        },
    })
}

pub async fn serve(State(st): State<Shared>) -> Json<Value> {
    let mut names = vec!["base".to_string()];
    names.extend(st.mgr.image_names());
    names.extend(st.mgr.template_aliases().into_keys());
    Json(document(&names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_documents_its_errors_and_auth() {
        let d = document(&["base".to_string()]);
        let paths = d["paths"].as_object().unwrap();
        let mut n = 0;
        for (p, ops) in paths {
            for (m, o) in ops.as_object().unwrap() {
                n += 1;
                assert!(o["responses"]["401"].is_object(), "{m} {p} lacks 401");
                assert_eq!(o["security"][0]["apiKey"], json!([]), "{m} {p}");
            }
        }
        assert_eq!(n, 9, "every control-plane route is described");
        assert_eq!(d["components"]["schemas"]["NewSandbox"]["properties"]["templateID"]["enum"], json!(["base"]));
    }
}
