//! git against the forge: fetch and push over HTTPS with the token in a private config file, never in argv or a URL.
