// The stock E2B JavaScript SDK (npm `e2b`, pinned; scripts/test installs it) against `hutch serve` (run by
// tests/e2b.rs with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY): create with envs and metadata, commands
// (streamed output, a non-zero exit), files (text and bytes, list, exists, remove), kill. Prints `ok: <step>`.
import { Sandbox, CommandExitError } from 'e2b'

const ok = (step) => console.log(`ok: ${step}`)
const expect = (cond, what) => { if (!cond) throw new Error(what) }

const sbx = await Sandbox.create({ envs: { GREETING: 'hello from js' }, metadata: { suite: 'npm' }, timeoutMs: 600_000 })
ok(`create ${sbx.sandboxId}`)

const outs = []
const r = await sbx.commands.run('echo "$GREETING"; echo err >&2', { onStdout: (d) => outs.push(d) })
expect(r.exitCode === 0 && r.stdout === 'hello from js\n' && r.stderr.includes('err'), `run: ${JSON.stringify(r)}`)
expect(outs.join('') === r.stdout, `streamed stdout: ${JSON.stringify(outs)}`)
ok('commands.run with streamed output')

try {
  await sbx.commands.run('exit 7')
  throw new Error('a non-zero exit did not throw')
} catch (e) {
  expect(e instanceof CommandExitError && e.exitCode === 7, `non-zero exit: ${e}`)
}
ok('non-zero exit throws CommandExitError')

await sbx.files.write('/home/user/js/a.txt', 'text from js')
expect((await sbx.files.read('/home/user/js/a.txt')) === 'text from js', 'text round trip')
const bytes = new Uint8Array(300_000).map((_, i) => (i * 7) & 0xff)
await sbx.files.write('/home/user/js/b.bin', bytes.buffer)
const back = await sbx.files.read('/home/user/js/b.bin', { format: 'bytes' })
expect(back.length === bytes.length && back.every((b, i) => b === bytes[i]), 'bytes round trip')
const names = (await sbx.files.list('/home/user/js')).map((e) => e.name).sort()
expect(JSON.stringify(names) === '["a.txt","b.bin"]', `list: ${names}`)
await sbx.files.remove('/home/user/js/a.txt')
expect(!(await sbx.files.exists('/home/user/js/a.txt')), 'removed')
ok('files write/read/list/exists/remove')

const listed = await Sandbox.list({ query: { metadata: { suite: 'npm' } } }).nextItems()
expect(listed.length === 1 && listed[0].sandboxId === sbx.sandboxId, `list by metadata: ${JSON.stringify(listed)}`)
ok('list by metadata')

await sbx.kill()
ok('kill')
console.log('ALL OK')
