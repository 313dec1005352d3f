// Node 20 compatibility shim for js-libp2p 3.x.
//
// js-libp2p 3.x (and its deps: @libp2p/utils, yamux, ping, mortice, ...) call
// `Promise.withResolvers()`, which Node only ships from v22. This module must be
// evaluated before any libp2p code runs: import it first (interop.mjs and
// selftest.mjs import it as their first static import and load libp2p with
// dynamic `await import(...)` afterwards).
if (typeof Promise.withResolvers !== 'function') {
  Object.defineProperty(Promise, 'withResolvers', {
    configurable: true,
    writable: true,
    enumerable: false,
    value: function withResolvers () {
      let resolve
      let reject
      const promise = new this((res, rej) => {
        resolve = res
        reject = rej
      })
      return { promise, resolve, reject }
    }
  })
}
