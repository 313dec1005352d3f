#!/usr/bin/env node
// js-libp2p interop harness for relaygate (circuit relay v2 hop).
//
// Spawned as a child process by the Rust integration tests. Every line this
// script writes to stdout is one JSON object with an "event" field; anything
// diagnostic goes to stderr. See README.md for the line formats.
//
//   node interop.mjs dial    <multiaddr>       [--pings N] [--timeout-ms T]
//   node interop.mjs reserve <relay multiaddr> [--timeout-ms T] [--ignore-stdin]
//   node interop.mjs listen  <tcp multiaddr>   [--seed N] [--ignore-stdin]
//
// The shim MUST be the first import: js-libp2p 3.x needs Promise.withResolvers
// (Node >= 22). Static imports are evaluated in order, and libp2p itself is
// only loaded afterwards via dynamic import(), so the shim always wins.
import './shim.mjs'
import { parseArgs } from 'node:util'
import { fstatSync } from 'node:fs'

const USAGE = `usage:
  node interop.mjs dial <multiaddr> [--pings N] [--timeout-ms T] [--seed N]
  node interop.mjs reserve <relay multiaddr> [--timeout-ms T] [--ignore-stdin]
  node interop.mjs listen <tcp multiaddr> [--seed N] [--ignore-stdin]`

// ---------------------------------------------------------------- output ---

function jsonReplacer (_key, value) {
  return typeof value === 'bigint' ? value.toString() : value
}

function emit (obj) {
  // stdout to a pipe is synchronous on Linux/macOS, so lines are never lost
  // even if we process.exit() right after.
  process.stdout.write(JSON.stringify(obj, jsonReplacer) + '\n')
}

function errorMessage (err) {
  if (err == null) return 'unknown error'
  if (typeof err !== 'object') return String(err)
  let msg = `${err.name ?? 'Error'}: ${err.message ?? String(err)}`
  if (Array.isArray(err.errors) && err.errors.length > 0) {
    msg += ' [' + err.errors.map(errorMessage).join('; ') + ']'
  }
  if (err.cause != null && err.cause !== err) {
    msg += ` (cause: ${errorMessage(err.cause)})`
  }
  return msg
}

// circuit relay v2 status names as they appear in js-libp2p error messages,
// e.g. "reservation failed with status PERMISSION_DENIED" or
// "failed to connect via relay with status NO_RESERVATION".
function statusOf (message) {
  const m = /with status ([A-Z_]+)/.exec(message)
  return m == null ? null : m[1]
}

function emitError (stage, err) {
  // some libp2p errors embed inner errors' stack traces in their message;
  // drop the "    at ..." lines, keep everything else
  const message = errorMessage(err)
    .split('\n')
    .filter(line => !/^\s+at /.test(line))
    .join('\n')
    .trim()
  emit({ event: 'error', stage, message, status: statusOf(message) })
}

// A connection is "limited" exactly when connection.limits is set. The
// `bytes` / `seconds` fields are getters (invisible to JSON.stringify), so read
// them explicitly. They are *remaining* budgets: `bytes` (bigint -> string) is
// already reduced by the noise/yamux/identify traffic that happened before we
// get to see the connection, `seconds` counts down from the relay's duration.
//
// The exact values the relay sent (Limit.data / Limit.duration in the
// STATUS / STOP CONNECT message) are not exposed by js-libp2p, so we capture
// them when circuit-relay-v2's LimitTracker hands the limits object to the
// upgrader (before any byte has been counted) -- see captureRelayLimits().
const relayLimits = new WeakMap()

function limitsOf (conn) {
  const limits = conn.limits
  const bytes = limits?.bytes
  const seconds = limits?.seconds
  const initial = limits == null ? undefined : relayLimits.get(limits)
  return {
    limited: limits != null,
    limit_bytes: bytes == null ? null : bytes.toString(),
    limit_seconds: seconds == null ? null : Number(seconds),
    relay_limit_bytes: initial?.bytes == null ? null : initial.bytes.toString(),
    relay_limit_seconds: initial?.seconds ?? null
  }
}

/**
 * Wrap LimitTracker.getLimits() of @libp2p/circuit-relay-v2 (an internal
 * module, loaded by file URL so that it is the very same module instance the
 * package uses) to remember the relay-sent limit for each limits object.
 * getLimits() is called once per relayed connection, right after the STATUS
 * (outbound) / STOP CONNECT (inbound) message was read and before the
 * connection is upgraded, so `bytes` is still the untouched Limit.data and
 * `expires - now` rounds to Limit.duration. Best effort: if the internals
 * ever move, the relay_limit_* fields are simply null.
 */
async function captureRelayLimits () {
  try {
    const utilsUrl = new URL('./utils.js', import.meta.resolve('@libp2p/circuit-relay-v2'))
    const { LimitTracker } = await import(utilsUrl.href)
    const orig = LimitTracker?.prototype?.getLimits
    if (typeof orig !== 'function' || orig.__relaygateWrapped === true) return
    const wrapped = function getLimits () {
      const out = orig.call(this)
      if (out != null) {
        relayLimits.set(out, {
          bytes: this.bytes ?? null,
          seconds: this.expires == null ? null : Math.round((this.expires - Date.now()) / 1000)
        })
      }
      return out
    }
    wrapped.__relaygateWrapped = true
    LimitTracker.prototype.getLimits = wrapped
  } catch (err) {
    process.stderr.write(`interop: cannot capture relay limits: ${errorMessage(err)}\n`)
  }
}

// ----------------------------------------------------------------- utils ---

function parsePositiveInt (name, value, allowZero = false) {
  const n = Number(value)
  if (!Number.isInteger(n) || n < 0 || (!allowZero && n === 0)) {
    throw new Error(`--${name} must be a ${allowZero ? 'non-negative' : 'positive'} integer, got ${JSON.stringify(value)}`)
  }
  return n
}

/** Reject with a TimeoutError-ish error after `ms`, unless `promise` settles first. */
async function withTimeout (promise, ms, what) {
  let timer
  const timeout = new Promise((_resolve, reject) => {
    timer = setTimeout(() => {
      const err = new Error(`${what} timed out after ${ms}ms`)
      err.name = 'TimeoutError'
      reject(err)
    }, ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

let exiting = false
/** Stop the node (bounded) and exit. Never hangs. */
async function shutdown (node, code) {
  if (exiting) return
  exiting = true
  // hard backstop in case something below wedges
  setTimeout(() => process.exit(code), 3000).unref()
  if (node != null) {
    try {
      await withTimeout(node.stop(), 2000, 'node.stop()')
    } catch (err) {
      process.stderr.write(`interop: error while stopping node: ${errorMessage(err)}\n`)
    }
  }
  process.exit(code)
}

async function loadLibp2p () {
  const [
    { createLibp2p },
    { tcp },
    { circuitRelayTransport },
    { noise },
    { yamux },
    { identify },
    { ping, PING_PROTOCOL },
    { multiaddr }
  ] = await Promise.all([
    import('libp2p'),
    import('@libp2p/tcp'),
    import('@libp2p/circuit-relay-v2'),
    import('@chainsafe/libp2p-noise'),
    import('@chainsafe/libp2p-yamux'),
    import('@libp2p/identify'),
    import('@libp2p/ping'),
    import('@multiformats/multiaddr')
  ])
  await captureRelayLimits()
  return { createLibp2p, tcp, circuitRelayTransport, noise, yamux, identify, ping, PING_PROTOCOL, multiaddr }
}

async function makeNode (lib, { listen, timeoutMs, seed }) {
  // --seed N: the Ed25519 key whose seed is 32 bytes of N, as lab-node's
  // --seed, so a test can put this node's peer id on an allow-list.
  let privateKey
  if (seed != null) {
    const { generateKeyPairFromSeed } = await import('@libp2p/crypto/keys')
    privateKey = await generateKeyPairFromSeed('Ed25519', new Uint8Array(32).fill(seed))
  }
  return lib.createLibp2p({
    ...(privateKey != null ? { privateKey } : {}),
    start: false,
    addresses: { listen },
    transports: [
      lib.tcp(),
      lib.circuitRelayTransport({
        // how long opening the relay connection + RESERVE may take
        reservationCompletionTimeout: timeoutMs
      })
    ],
    connectionEncrypters: [lib.noise()],
    streamMuxers: [lib.yamux()],
    services: {
      identify: lib.identify(),
      // answers pings on limited (relayed) connections too (default in 3.x,
      // but be explicit)
      ping: lib.ping({ runOnLimitedConnection: true, timeout: timeoutMs })
    }
  })
}

/**
 * One /ipfs/ping/1.0.0 round trip over *this* connection.
 *
 * We deliberately do not use node.services.ping.ping(peerId | multiaddr):
 * libp2p's connection manager never reuses a *limited* connection for a peer
 * id / multiaddr dial target (findExistingConnection skips connections with
 * `limits`), so every such ping dials the circuit again -- a second HOP
 * CONNECT through the relay -- and then aborts the new connection as a
 * "Duplicate multiaddr connection" and uses the old one. Against relaygate
 * that would show up as extra circuits. Opening the stream on `conn` itself
 * avoids that; the wire exchange mirrors @libp2p/ping's client (32 random
 * bytes out, the same 32 bytes back).
 */
async function pingOverConnection (conn, protocol, timeoutMs) {
  const signal = AbortSignal.timeout(timeoutMs)
  const stream = await conn.newStream(protocol, { signal, runOnLimitedConnection: true })
  try {
    const data = crypto.getRandomValues(new Uint8Array(32))
    const received = []
    let receivedLen = 0
    const start = Date.now()
    const done = Promise.withResolvers()
    const onAbort = () => done.reject(signal.reason ?? new Error('ping aborted'))
    signal.addEventListener('abort', onAbort, { once: true })
    const onClose = () => done.reject(new Error(`ping stream closed after ${receivedLen} of 32 bytes`))
    stream.addEventListener('close', onClose, { once: true })
    stream.addEventListener('message', (evt) => {
      const chunk = evt.data.subarray()
      received.push(chunk)
      receivedLen += chunk.byteLength
      if (receivedLen >= 32) done.resolve(Date.now() - start)
    })
    stream.send(data)
    let rtt
    try {
      rtt = await done.promise
    } finally {
      signal.removeEventListener('abort', onAbort)
      stream.removeEventListener('close', onClose)
    }
    const got = Buffer.concat(received.map(c => Buffer.from(c.buffer, c.byteOffset, c.byteLength)))
    if (got.length !== 32 || !got.equals(Buffer.from(data))) {
      throw new Error(`wrong ping echo (${got.length} bytes)`)
    }
    await stream.close({ signal })
    return rtt
  } catch (err) {
    stream.abort(err)
    throw err
  }
}

// ------------------------------------------------------------------ dial ---

async function runDial (target, { pings, timeoutMs, seed }) {

  let stage = 'setup'
  let node
  try {
    const lib = await loadLibp2p()
    const ma = lib.multiaddr(target)
    // A dial-only node: no listen addresses are needed, the circuit relay
    // transport is only used for dialing here.
    node = await makeNode(lib, { listen: [], timeoutMs, seed })
    await node.start()

    stage = 'dial'
    const signal = AbortSignal.timeout(timeoutMs)
    const conn = await withTimeout(node.dial(ma, { signal }), timeoutMs + 500, 'dial')
    emit({
      event: 'connected',
      peer: conn.remotePeer.toString(),
      remote_addr: conn.remoteAddr.toString(),
      ...limitsOf(conn)
    })

    stage = 'ping'
    for (let i = 0; i < pings; i++) {
      const rtt = await withTimeout(pingOverConnection(conn, lib.PING_PROTOCOL, timeoutMs), timeoutMs + 500, 'ping')
      emit({ event: 'ping', rtt_ms: rtt })
    }

    emit({ event: 'done' })
    await shutdown(node, 0)
  } catch (err) {
    emitError(stage, err)
    await shutdown(node, 1)
  }
}

// --------------------------------------------------------------- reserve ---

/** Does stdin look like something whose EOF means "parent wants us gone"? */
function stdinIsControlChannel () {
  try {
    const st = fstatSync(0)
    // pipes / sockets (e.g. Rust Stdio::piped()) and terminals: yes.
    // /dev/null (Stdio::null()) or a regular file would hit EOF at once: no.
    if (st.isFIFO() || st.isSocket()) return true
    if (st.isCharacterDevice()) return process.stdin.isTTY === true
    return false
  } catch {
    return false
  }
}

async function runReserve (relay, { timeoutMs, ignoreStdin }) {

  let stage = 'setup'
  let node
  try {
    const lib = await loadLibp2p()
    let relayMa = lib.multiaddr(relay)
    // accept both "<relay>" and "<relay>/p2p-circuit"
    if (!relayMa.toString().endsWith('/p2p-circuit')) {
      relayMa = relayMa.encapsulate('/p2p-circuit')
    }
    node = await makeNode(lib, { listen: [relayMa.toString()], timeoutMs })

    node.addEventListener('connection:open', (evt) => {
      const conn = evt.detail
      if (conn.direction !== 'inbound') return
      emit({
        event: 'inbound',
        peer: conn.remotePeer.toString(),
        remote_addr: conn.remoteAddr.toString(),
        ...limitsOf(conn)
      })
    })

    emit({ event: 'peer', peer: node.peerId.toString() })

    // Listening on "<relay>/p2p-circuit" makes node.start() dial the relay and
    // send a HOP RESERVE; a refused reservation makes start() reject with an
    // error whose message contains "reservation failed with status <STATUS>".
    stage = 'reserve'
    await withTimeout(node.start(), timeoutMs, 'reservation')

    const deadline = Date.now() + timeoutMs
    let addrs = []
    for (;;) {
      addrs = node.getMultiaddrs().map(ma => ma.toString())
      if (addrs.some(a => a.includes('/p2p-circuit'))) break
      if (Date.now() > deadline) {
        throw new Error(`no /p2p-circuit address appeared within ${timeoutMs}ms (addrs: ${JSON.stringify(addrs)})`)
      }
      await new Promise(resolve => setTimeout(resolve, 50))
    }
    emit({ event: 'reserved', addrs })

    stage = 'serve'
    serveUntilGone(node, ignoreStdin)
  } catch (err) {
    emitError(stage, err)
    await shutdown(node, 1)
  }
}

// ---------------------------------------------------------------- listen ---

/** Stays until stdin ends (the parent is gone) or a signal comes. */
function serveUntilGone (node, ignoreStdin) {
  const onSignal = () => { void shutdown(node, 0) }
  process.once('SIGTERM', onSignal)
  process.once('SIGINT', onSignal)
  if (!ignoreStdin && stdinIsControlChannel()) {
    process.stdin.on('end', () => { void shutdown(node, 0) })
    process.stdin.on('close', () => { void shutdown(node, 0) })
    process.stdin.on('error', () => { void shutdown(node, 0) })
    process.stdin.resume()
  } else {
    setInterval(() => {}, 1 << 30)
  }
}

/**
 * A plain js-libp2p node listening on TCP (a node behind relaygate's agent):
 * it answers identify and ping, and reports each inbound connection with the
 * address it came from, as the node sees it.
 */
async function runListen (listen, { timeoutMs, seed, ignoreStdin }) {
  let stage = 'setup'
  let node
  try {
    const lib = await loadLibp2p()
    node = await makeNode(lib, { listen: [listen], timeoutMs, seed })
    node.addEventListener('connection:open', (evt) => {
      const conn = evt.detail
      if (conn.direction !== 'inbound') return
      emit({
        event: 'inbound',
        peer: conn.remotePeer.toString(),
        remote_addr: conn.remoteAddr.toString(),
        ...limitsOf(conn)
      })
    })
    stage = 'listen'
    await withTimeout(node.start(), timeoutMs, 'listen')
    emit({
      event: 'listening',
      peer: node.peerId.toString(),
      addrs: node.getMultiaddrs().map(ma => ma.toString())
    })
    stage = 'serve'
    serveUntilGone(node, ignoreStdin)
  } catch (err) {
    emitError(stage, err)
    await shutdown(node, 1)
  }
}

// ------------------------------------------------------------------ main ---

async function main () {
  let parsed
  try {
    parsed = parseArgs({
      args: process.argv.slice(2),
      allowPositionals: true,
      strict: true,
      options: {
        pings: { type: 'string' },
        'timeout-ms': { type: 'string' },
        seed: { type: 'string' },
        'ignore-stdin': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' }
      }
    })
  } catch (err) {
    emitError('args', err)
    process.stderr.write(USAGE + '\n')
    process.exit(2)
  }
  const { values, positionals } = parsed
  if (values.help === true) {
    process.stderr.write(USAGE + '\n')
    process.exit(0)
  }
  const [mode, addr, ...rest] = positionals
  if (addr == null || rest.length > 0 || !['dial', 'reserve', 'listen'].includes(mode)) {
    emitError('args', new Error(`bad arguments: ${JSON.stringify(process.argv.slice(2))}`))
    process.stderr.write(USAGE + '\n')
    process.exit(2)
  }
  let pings, timeoutMs, seed
  try {
    pings = values.pings == null ? 3 : parsePositiveInt('pings', values.pings, true)
    seed = values.seed == null ? undefined : parsePositiveInt('seed', values.seed)
    timeoutMs = values['timeout-ms'] == null ? 20000 : parsePositiveInt('timeout-ms', values['timeout-ms'])
  } catch (err) {
    emitError('args', err)
    process.exit(2)
  }
  if (mode === 'dial') {
    await runDial(addr, { pings, timeoutMs, seed })
  } else if (mode === 'listen') {
    await runListen(addr, { timeoutMs, seed, ignoreStdin: values['ignore-stdin'] === true })
  } else {
    await runReserve(addr, { timeoutMs, ignoreStdin: values['ignore-stdin'] === true })
  }
}

process.on('unhandledRejection', (err) => {
  process.stderr.write(`interop: unhandled rejection: ${errorMessage(err)}\n`)
})

main().catch(async (err) => {
  emitError('internal', err)
  process.exit(1)
})
