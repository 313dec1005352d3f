// relaygate operator dashboard: one page for the admin API of the gateway and of the agent.
//
// Vanilla JS, no build step, nothing loaded from elsewhere. It reads GET /v1/events (server-sent
// events, `event: overview` + one JSON line, about once a second) with fetch() rather than
// EventSource so that it can send `Authorization: Bearer <token>`, and draws the gateway or the
// agent view from the overview's "role". Views are built once; each event only updates data
// regions (text, keyed table rows), so forms and armed buttons keep their state.
'use strict';

const TOKEN_KEY = 'relaygate-admin-token';
const WINDOW_MS = 5 * 60 * 1000; // throughput chart span
const STALL_MS = 5000; // no byte from /v1/events for this long: reconnect
const RETRY_MS = 1000;

// ---------------------------------------------------------------- DOM helpers

function h(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'testid') e.dataset.testid = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of kids.flat()) if (c != null) e.append(c);
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

const byId = (id) => document.getElementById(id);

function setText(el, t) {
  t = t == null ? '' : String(t);
  if (el.textContent !== t) el.textContent = t;
}

function setAttr(el, name, v) {
  if (v == null) {
    if (el.hasAttribute(name)) el.removeAttribute(name);
  } else if (el.getAttribute(name) !== String(v)) el.setAttribute(name, v);
}

function setClass(el, cls) {
  if (el.className !== cls) el.className = cls;
}

// A value for setCell/setVal: a string, or {text, title, cls}.
function setVal(el, v, baseCls) {
  if (v === undefined) return;
  const o = v !== null && typeof v === 'object' ? v : { text: v };
  setText(el, o.text == null ? '—' : o.text);
  setAttr(el, 'title', o.title == null ? null : o.title);
  if (baseCls !== undefined) setClass(el, [baseCls, o.cls].filter(Boolean).join(' '));
}

// ---------------------------------------------------------------- formatting

const nowSecs = () => Date.now() / 1000;

function fmtBytes(n) {
  if (n == null || !isFinite(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  n = Number(n);
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + ' ' + units[i];
}

function fmtBits(bps) {
  if (bps == null || !isFinite(bps)) return '—';
  const units = ['bit/s', 'kbit/s', 'Mbit/s', 'Gbit/s', 'Tbit/s'];
  let i = 0;
  while (Math.abs(bps) >= 1000 && i < units.length - 1) { bps /= 1000; i++; }
  return (i === 0 ? String(Math.round(bps)) : bps.toFixed(bps < 10 ? 2 : bps < 100 ? 1 : 0)) + ' ' + units[i];
}

// A cap in bytes per second, shown as bit/s; 0 means uncapped.
function fmtCap(bytesPerSec) {
  if (bytesPerSec == null) return '—';
  return bytesPerSec === 0 ? 'uncapped' : fmtBits(bytesPerSec * 8);
}

function fmtBurst(bytes) {
  if (bytes == null) return '—';
  return bytes === 0 ? 'default' : fmtBytes(bytes);
}

function fmtDuration(secs) {
  if (secs == null || !isFinite(secs)) return '—';
  secs = Math.max(0, Math.floor(secs));
  const d = Math.floor(secs / 86400), hh = Math.floor(secs / 3600) % 24;
  const m = Math.floor(secs / 60) % 60, s = secs % 60;
  if (d) return `${d} d ${hh} h`;
  if (hh) return `${hh} h ${m} m`;
  if (m) return `${m} m ${s} s`;
  return `${s} s`;
}

function compact(secs) {
  secs = Math.floor(Math.abs(secs));
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} m`;
  if (secs < 86400) return `${Math.floor(secs / 3600)} h`;
  return `${Math.floor(secs / 86400)} d`;
}

// Unix seconds -> {text: "3 m ago", title: local date}. Server and browser clocks may differ a
// little: a moment "in the future" by less than a minute is shown as "just now".
function ago(unix) {
  if (unix == null) return { text: '—' };
  const d = nowSecs() - unix;
  const title = new Date(unix * 1000).toLocaleString();
  if (d < 2 && d > -60) return { text: 'just now', title };
  return { text: d > 0 ? `${compact(d)} ago` : `in ${compact(d)}`, title };
}

function until(unix) {
  if (unix == null) return { text: 'never' };
  const d = unix - nowSecs();
  const title = new Date(unix * 1000).toLocaleString();
  return { text: d > 0 ? `in ${compact(d)}` : 'expired', title };
}

function age(unix) {
  if (unix == null) return { text: '—' };
  return { text: fmtDuration(nowSecs() - unix), title: new Date(unix * 1000).toLocaleString() };
}

function shortId(id) {
  if (!id) return '—';
  return id.length > 20 ? `${id.slice(0, 12)}…${id.slice(-6)}` : id;
}

const idVal = (id) => ({ text: shortId(id), title: id || null });
const yesNo = (b) => (b ? 'yes' : 'no');
const num = (n) => (n == null ? '—' : Number(n).toLocaleString('en-US'));

// "1000000", "10M", "512K", "1.5Mi", "2GiB/s" -> bytes per second (K M G T are powers of 1000,
// Ki Mi Gi Ti powers of 1024). Empty -> null. Anything else throws.
function parseRate(text) {
  const s = text.trim().replace(/_/g, '');
  if (!s) return null;
  const m = /^(\d+(?:\.\d+)?)\s*(?:([kKmMgGtT])(i?))?\s*B?(?:\/s)?$/.exec(s);
  if (!m) throw new Error(`not a number of bytes per second: "${text}" (try 1000000, 10M, 512Ki)`);
  const pow = { '': 0, k: 1, m: 2, g: 3, t: 4 }[(m[2] || '').toLowerCase()];
  const n = Math.round(Number(m[1]) * (m[3] ? 1024 : 1000) ** pow);
  if (!Number.isSafeInteger(n)) throw new Error(`too large: "${text}"`);
  return n;
}

// ---------------------------------------------------------------- tables and lists

// cols: [{label, cls}]. The table stays in the page when empty and shows a "none" row (in a
// tfoot that is only in the DOM while there is no row, so `tbody tr` counts data rows only).
function makeTable(cols, props) {
  const tbody = h('tbody');
  const emptyRow = h('tfoot', { class: 'empty-row' },
    h('tr', null, h('td', { colspan: String(cols.length) }, (props && props.empty) || 'none')));
  const table = h('table', { testid: props && props.testid },
    h('thead', null, h('tr', null, cols.map((c) => h('th', { class: /\bnum\b/.test(c.cls || '') ? 'num' : null }, c.label)))),
    tbody, emptyRow);
  return { root: h('div', { class: 'scroll' }, table), table, tbody, emptyRow, cols };
}

// Keyed update: rows are kept (and their buttons' state) as long as their key is present.
// render(item, tr) returns one value per column (undefined = leave that cell alone);
// create(tr, item) may fill cells once (buttons), and can read tr.item later.
function syncRows(t, items, key, render, opts = {}) {
  const old = new Map();
  for (const tr of t.tbody.children) old.set(tr.rowKey, tr);
  let prev = null;
  for (const item of items) {
    const k = key(item);
    let tr = old.get(k);
    if (tr) old.delete(k);
    else {
      tr = h('tr');
      tr.rowKey = k;
      tr.cells_ = t.cols.map((c) => tr.appendChild(h('td', { class: c.cls })));
      if (opts.testid) tr.dataset.testid = opts.testid(item);
      if (opts.create) opts.create(tr, item);
    }
    tr.item = item;
    render(item, tr).forEach((v, i) => setVal(tr.cells_[i], v, t.cols[i].cls || ''));
    if (opts.rowClass) setClass(tr, opts.rowClass(item) || '');
    const want = prev ? prev.nextSibling : t.tbody.firstChild;
    if (want !== tr) t.tbody.insertBefore(tr, want);
    prev = tr;
  }
  for (const tr of old.values()) tr.remove();
  if (items.length > 0) t.emptyRow.remove();
  else if (!t.emptyRow.isConnected) t.table.append(t.emptyRow);
}

// A list of addresses, one per line, each with a copy button.
function makeAddrList(testid, emptyText) {
  const ul = h('ul', { class: 'addrs', testid });
  const empty = h('p', { class: 'empty muted' }, emptyText || 'none');
  return { root: h('div', null, ul, empty), ul, empty };
}

function syncAddrList(l, addrs) {
  const uniq = [...new Set(addrs.filter(Boolean))];
  const old = new Map();
  for (const li of l.ul.children) old.set(li.rowKey, li);
  let prev = null;
  for (const a of uniq) {
    let li = old.get(a);
    if (li) old.delete(a);
    else {
      li = h('li', null, h('code', null, a), copyButton(() => a));
      li.rowKey = a;
    }
    const want = prev ? prev.nextSibling : l.ul.firstChild;
    if (want !== li) l.ul.insertBefore(li, want);
    prev = li;
  }
  for (const li of old.values()) li.remove();
  l.empty.hidden = uniq.length > 0;
}

function copyButton(getText) {
  const b = h('button', { type: 'button', class: 'copy', title: 'copy to the clipboard' }, 'copy');
  b.addEventListener('click', async () => {
    const text = getText();
    let ok = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        ok = true;
      } else {
        const ta = h('textarea', { readonly: true, style: 'position:fixed;top:0;left:0;opacity:0' });
        ta.value = text;
        document.body.append(ta);
        ta.select();
        ok = document.execCommand('copy');
        ta.remove();
      }
    } catch (_) { ok = false; }
    b.textContent = ok ? 'copied' : 'copy failed';
    setTimeout(() => { b.textContent = 'copy'; }, 1500);
  });
  return b;
}

function kv(pairs) {
  // pairs: [[label, ddElement]]
  return h('dl', { class: 'kv' }, pairs.flatMap(([k, dd]) => [h('dt', null, k), dd]));
}

function card(title, ...kids) {
  return h('section', { class: 'card' }, title ? h('h2', null, title) : null, ...kids);
}

// ---------------------------------------------------------------- token, API calls, messages

let memoryToken = null; // used when sessionStorage is unavailable
function getToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || null; } catch (_) { return memoryToken; }
}
function putToken(t) {
  memoryToken = t;
  try { sessionStorage.setItem(TOKEN_KEY, t); } catch (_) { /* memory only */ }
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const t = getToken();
  if (t) headers.Authorization = `Bearer ${t}`;
  return headers;
}

let tokenWait = null;
let tokenResolve = null;
// Shows the token prompt; resolves once the user gave a token. Callers then retry.
function needToken(hadToken) {
  setText(byId('token-why'), hadToken
    ? 'The admin API refused the token. Enter a valid admin token.'
    : 'This admin API needs a token.');
  byId('token-form').hidden = false;
  if (!tokenWait) tokenWait = new Promise((resolve) => { tokenResolve = resolve; });
  return tokenWait;
}

function initTokenForm() {
  byId('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = byId('token-input');
    const t = input.value.trim();
    if (!t) { input.focus(); return; }
    putToken(t);
    input.value = '';
    byId('token-form').hidden = true;
    const resolve = tokenResolve;
    tokenWait = tokenResolve = null;
    if (resolve) resolve();
  });
}

// -> {ok, status, text}; a 401 asks for a token and retries. Throws only on network errors.
async function api(method, path, body) {
  for (;;) {
    const hadToken = !!getToken();
    const headers = authHeaders(body === undefined ? {} : { 'Content-Type': 'application/json' });
    const res = await fetch(path, {
      method, headers, cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (res.status === 401) { await needToken(hadToken); continue; }
    return { ok: res.ok, status: res.status, text: await res.text() };
  }
}

function showMessage(kind, text, status) {
  const box = byId('message');
  const t = byId('message-text');
  t.replaceChildren();
  if (kind === 'err') t.append(h('strong', null, status ? `Error (HTTP ${status}): ` : 'Error: '));
  t.append(text);
  box.className = `message ${kind}`;
  box.hidden = false;
}

// Runs one admin action: disables the button meanwhile, reports in the message area (and in the
// optional note next to the button). onOk(res) runs after a 2xx.
async function act(button, label, method, path, body, onOk, note) {
  button.disabled = true;
  if (note) { setText(note, ''); note.className = 'note'; }
  try {
    const res = await api(method, path, body);
    if (res.ok) {
      const extra = res.text.trim();
      showMessage('ok', extra && extra.length < 2000 && !extra.startsWith('{') ? `${label}: ${extra}` : label);
      if (note) { setText(note, 'done'); note.className = 'note ok'; }
      if (onOk) onOk(res);
    } else {
      showMessage('err', res.text.trim() || res.status, res.status);
      if (note) { setText(note, 'failed, see the message above'); note.className = 'note err'; }
    }
    return res;
  } catch (e) {
    showMessage('err', `request failed: ${e.message}`);
    if (note) { setText(note, 'failed'); note.className = 'note err'; }
    return null;
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- live event stream

function setLive(on) {
  const pill = byId('live');
  setText(pill, on ? 'live' : 'reconnecting');
  setClass(pill, on ? 'pill live' : 'pill');
}

// Parses one SSE frame (lines without the blank separator).
function parseFrame(frame) {
  let event = 'message';
  const data = [];
  for (const line of frame.split('\n')) {
    if (line === '' || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  }
  return data.length ? { event, data: data.join('\n') } : null;
}

async function streamEvents() {
  for (;;) {
    const ctrl = new AbortController();
    let stall = null;
    const kick = () => { clearTimeout(stall); stall = setTimeout(() => ctrl.abort(), STALL_MS); };
    try {
      kick();
      const hadToken = !!getToken();
      const res = await fetch('/v1/events', {
        headers: authHeaders({ Accept: 'text/event-stream' }), cache: 'no-store', signal: ctrl.signal,
      });
      if (res.status === 401) {
        clearTimeout(stall);
        if (res.body) res.body.cancel().catch(() => {});
        setLive(false);
        await needToken(hadToken);
        continue;
      }
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        kick();
        // Normalise CRLF / CR, but keep a trailing CR: its LF may come in the next chunk.
        buf = (buf + decoder.decode(value, { stream: true })).replace(/\r\n|\r(?!$)/g, '\n');
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const frame = parseFrame(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
          if (frame && (frame.event === 'overview' || frame.event === 'message')) {
            let data;
            try { data = JSON.parse(frame.data); } catch (e) { console.warn('bad overview JSON', e); continue; }
            setLive(true);
            onOverview(data);
          }
        }
      }
    } catch (e) {
      if (e.name !== 'AbortError') console.warn('event stream:', e.message);
    } finally {
      clearTimeout(stall);
      ctrl.abort();
    }
    setLive(false);
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
}

let view = null; // {role, update(data)}

function onOverview(data) {
  const role = data && data.role;
  if (!view || view.role !== role) {
    const root = byId('view');
    root.replaceChildren();
    byId('actions').replaceChildren();
    if (role === 'gateway') view = gatewayView();
    else if (role === 'agent') view = agentView();
    else {
      view = { role, update: () => {} };
      root.append(h('p', { class: 'err-text' }, `Unknown role "${role}" in /v1/events.`));
    }
    byId('loading').hidden = true;
  }
  view.update(data);
}

function header(title, data) {
  setText(byId('title'), title);
  document.title = title;
  setVal(byId('peer'), idVal(data.peer_id));
  setText(byId('version'), data.version ? `v${data.version}` : '');
  setText(byId('uptime'), data.uptime_secs == null ? '' : `up ${fmtDuration(data.uptime_secs)}`);
}

// ---------------------------------------------------------------- gateway view

function tile(testid, label, cls) {
  const value = h('div', { class: 'value' }, '—');
  const sub = h('div', { class: 'sub' });
  return { el: h('div', { class: `tile ${cls || ''}`, testid }, h('div', { class: 'label' }, label), value, sub), value, sub };
}

// Throughput from successive totals, over the last WINDOW_MS.
function throughputChart() {
  const samples = []; // {t (ms), inb, outb} in bit/s
  let last = null; // {t, inb, outb} cumulative bytes
  const el = svg('svg', { class: 'chart', 'data-testid': 'throughput-chart', 'data-points': '0', 'data-last-bps': '0', role: 'img', 'aria-label': 'throughput, last 5 minutes' });
  const gridTop = svg('line', { class: 'grid-line' });
  const gridMid = svg('line', { class: 'grid-line' });
  const gridBottom = svg('line', { class: 'grid-line' });
  const inLine = svg('polyline', { class: 'in', points: '' });
  const outLine = svg('polyline', { class: 'out', points: '' });
  const maxLabel = svg('text', { class: 'axis-label', x: '4', y: '12' });
  el.append(gridTop, gridMid, gridBottom, inLine, outLine, maxLabel);
  const legend = h('div', null,
    h('div', { class: 'axis' }, h('span', null, '5 m ago'), h('span', null, 'now')),
    h('div', { class: 'legend' }, h('span', { class: 'in' }, 'inbound (client → node)'), h('span', { class: 'out' }, 'outbound (node → client)')));

  function add(totals) {
    const t = performance.now();
    const cur = { t, inb: Number(totals.bytes_inbound) || 0, outb: Number(totals.bytes_outbound) || 0 };
    if (last) {
      const dt = (t - last.t) / 1000;
      if (dt < 0.2) return; // too close to the previous event: fold into the next one
      samples.push({
        t,
        // a counter going down (restart) counts as no traffic, not negative traffic
        inb: Math.max(0, cur.inb - last.inb) * 8 / dt,
        outb: Math.max(0, cur.outb - last.outb) * 8 / dt,
      });
    }
    last = cur;
    while (samples.length && t - samples[0].t > WINDOW_MS) samples.shift();
  }

  function niceMax(v) {
    if (v <= 1000) return 1000;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function draw() {
    const box = el.getBoundingClientRect();
    const w = Math.max(100, Math.round(box.width || 600));
    const hgt = Math.max(60, Math.round(box.height || 170));
    el.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
    const top = 18, bottom = hgt - 2;
    const max = niceMax(samples.reduce((m, s) => Math.max(m, s.inb, s.outb), 0));
    const now = performance.now();
    const x = (s) => (w - ((now - s.t) / WINDOW_MS) * w).toFixed(1);
    const y = (v) => (bottom - (v / max) * (bottom - top)).toFixed(1);
    inLine.setAttribute('points', samples.map((s) => `${x(s)},${y(s.inb)}`).join(' '));
    outLine.setAttribute('points', samples.map((s) => `${x(s)},${y(s.outb)}`).join(' '));
    for (const [line, yy] of [[gridTop, top], [gridMid, (top + bottom) / 2], [gridBottom, bottom]]) {
      line.setAttribute('x1', '0'); line.setAttribute('x2', String(w));
      line.setAttribute('y1', String(yy)); line.setAttribute('y2', String(yy));
    }
    maxLabel.textContent = fmtBits(max);
    const lastS = samples[samples.length - 1];
    el.setAttribute('data-points', String(samples.length));
    el.setAttribute('data-last-bps', String(lastS ? Math.round(lastS.inb + lastS.outb) : 0));
  }

  return { el, legend, add, draw, latest: () => samples[samples.length - 1] || null };
}

function gatewayView() {
  const root = byId('view');

  const reload = h('button', { type: 'button', testid: 'reload', title: 'POST /v1/reload' }, 'Reload configuration');
  reload.addEventListener('click', () => act(reload, 'Configuration reloaded', 'POST', '/v1/reload'));
  byId('actions').append(reload);

  const tiles = {
    sessions: tile('tile-sessions', 'sessions'),
    agents: tile('tile-agents', 'agents'),
    leases: tile('tile-leases', 'leases'),
    connections: tile('tile-connections', 'live connections'),
    inbound: tile('tile-inbound', 'inbound now', 'in'),
    outbound: tile('tile-outbound', 'outbound now', 'out'),
  };
  const chart = throughputChart();
  const addrs = makeAddrList('addresses', 'no address yet');

  const agentsBox = h('div');
  const agentsEmpty = h('p', { class: 'empty muted card' }, 'No agent is connected.');
  const cards = new Map(); // peer id -> agent card

  const leases = makeTable([
    { label: 'agent', cls: 'mono' }, { label: 'tunnel' }, { label: 'port', cls: 'num' },
    { label: 'in session' }, { label: 'last active' }, { label: '', cls: 'act' },
  ], { empty: 'no lease' });

  const bans = makeTable([
    { label: 'target', cls: 'mono brk' }, { label: 'reason', cls: 'brk' }, { label: 'source' },
    { label: 'expires' }, { label: '', cls: 'act' },
  ], { empty: 'nobody is banned' });

  const banTarget = h('input', { testid: 'ban-target', name: 'target', placeholder: '198.51.100.7, 198.51.100.0/24 or 12D3KooW…', autocomplete: 'off', spellcheck: 'false' });
  const banReason = h('input', { testid: 'ban-reason', name: 'reason', placeholder: 'why', autocomplete: 'off' });
  const banTtl = h('input', { testid: 'ban-ttl', name: 'ttl', placeholder: 'e.g. 1h, 30m (empty: forever)', autocomplete: 'off', spellcheck: 'false' });
  const banSubmit = h('button', { type: 'submit', class: 'primary', testid: 'ban-submit' }, 'Ban');
  const banNote = h('span', { class: 'note' });
  const banForm = h('form', { class: 'row', autocomplete: 'off' },
    h('label', { class: 'wide' }, 'IP, CIDR or peer id', banTarget),
    h('label', null, 'reason', banReason),
    h('label', null, 'expires after', banTtl),
    h('div', { class: 'buttons' }, banSubmit, banNote));
  banForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const target = banTarget.value.trim();
    if (!target) { showMessage('err', 'Enter an IP address, a CIDR block or a peer id to ban.'); banTarget.focus(); return; }
    const body = { target, reason: banReason.value.trim() };
    if (banTtl.value.trim()) body.ttl = banTtl.value.trim();
    act(banSubmit, `Banned ${target}`, 'POST', '/v1/blacklist', body, () => {
      banTarget.value = banReason.value = banTtl.value = '';
    }, banNote);
  });

  const refusals = makeTable([{ label: 'reason' }, { label: 'count', cls: 'num' }], { empty: 'none' });
  const badInput = makeTable([{ label: 'reason' }, { label: 'count', cls: 'num' }], { empty: 'none' });

  const dd = () => h('dd');
  const relay = { reservations: dd(), circuits: dd() };
  const udp = { channels: dd(), validated: dd(), unvalidated: dd() };
  const thr = { inbound: dd(), outbound: dd(), held: dd() };

  const fleet = makeTable([
    { label: 'gateway', cls: 'mono' }, { label: 'addresses', cls: 'lines' }, { label: 'ready' },
    { label: 'agents', cls: 'num' }, { label: 'ports', cls: 'num' },
  ]);
  const fleetCard = card('Fleet', fleet.root);
  fleetCard.hidden = true;

  root.append(
    h('div', { class: 'tiles' }, Object.values(tiles).map((t) => t.el)),
    card('Throughput', chart.el, chart.legend),
    h('h2', { class: 'section-title' }, 'Agents'),
    agentsEmpty,
    agentsBox,
    card('Leases', leases.root),
    card('Bans', bans.root, banForm),
    h('div', { class: 'grid' },
      card('Refused connections', refusals.root),
      card('Bad input', badInput.root),
      card('Relay', kv([['reservations', relay.reservations], ['circuits', relay.circuits]])),
      card('UDP tunnels', kv([['channels', udp.channels], ['flows (proved address)', udp.validated], ['flows (not yet)', udp.unvalidated]])),
      card('Throttling', kv([['held back inbound', thr.inbound], ['held back outbound', thr.outbound], ['time held', thr.held]]))),
    fleetCard,
    card('Gateway addresses', addrs.root),
  );
  window.addEventListener('resize', () => chart.draw());

  function update(d) {
    header('relaygate gateway', d);
    const tot = d.totals || {};
    setText(tiles.sessions.value, num(tot.sessions));
    setText(tiles.agents.value, num(tot.agents));
    setText(tiles.leases.value, num(tot.leases));
    setText(tiles.connections.value, num(tot.connections));
    chart.add(tot);
    chart.draw();
    const now = chart.latest();
    setText(tiles.inbound.value, now ? fmtBits(now.inb) : '…');
    setText(tiles.outbound.value, now ? fmtBits(now.outb) : '…');
    setText(tiles.inbound.sub, `total ${fmtBytes(tot.bytes_inbound)}`);
    setText(tiles.outbound.sub, `total ${fmtBytes(tot.bytes_outbound)}`);

    syncAddrList(addrs, d.addresses || []);

    // agent cards, keyed by peer id, in the order given
    const agents = d.agents || [];
    agentsEmpty.hidden = agents.length > 0;
    const seen = new Set();
    let prev = null;
    for (const a of agents) {
      seen.add(a.peer_id);
      let c = cards.get(a.peer_id);
      if (!c) { c = agentCard(a.peer_id); cards.set(a.peer_id, c); }
      c.update(a);
      const want = prev ? prev.nextSibling : agentsBox.firstChild;
      if (want !== c.el) agentsBox.insertBefore(c.el, want);
      prev = c.el;
    }
    for (const [id, c] of cards) if (!seen.has(id)) { c.el.remove(); cards.delete(id); }

    syncRows(leases, d.leases || [], (l) => `${l.agent}\u0000${l.tunnel}\u0000${l.port}`, (l) => [
      idVal(l.agent), l.tunnel, String(l.port), yesNo(l.in_session), ago(l.last_active), undefined,
    ], { testid: (l) => `lease-${l.port}`, create: (tr) => tr.cells_[5].append(revokeButton(tr)) });

    syncRows(bans, d.bans || [], (b) => b.target, (b) => [
      b.target, b.reason || '—', b.source || '—', until(b.expires), undefined,
    ], { testid: () => 'ban-row', create: (tr) => tr.cells_[4].append(liftButton(tr)) });

    const counts = (o) => Object.entries(o || {}).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    syncRows(refusals, counts(d.refusals), (e) => e[0], (e) => [e[0].replace(/_/g, ' '), num(e[1])]);
    syncRows(badInput, counts(d.bad_input), (e) => e[0], (e) => [e[0].replace(/_/g, ' '), num(e[1])]);

    const r = d.relay || {};
    setText(relay.reservations, num(r.reservations));
    setText(relay.circuits, num(r.circuits));
    const u = d.udp || {};
    setText(udp.channels, num(u.channels));
    setText(udp.validated, num(u.flows_validated));
    setText(udp.unvalidated, num(u.flows_unvalidated));
    const t = d.throttled || {};
    setText(thr.inbound, fmtBytes(t.inbound_bytes));
    setText(thr.outbound, fmtBytes(t.outbound_bytes));
    setText(thr.held, t.held_secs == null ? '—' : t.held_secs < 10 ? `${Number(t.held_secs).toFixed(1)} s` : fmtDuration(t.held_secs));

    const f = d.fleet || [];
    fleetCard.hidden = f.length === 0;
    syncRows(fleet, f, (g) => g.peer_id, (g) => [
      idVal(g.peer_id), (g.addresses || []).join('\n') || '—', yesNo(g.ready), num(g.agents), num(g.ports),
    ], { rowClass: (g) => (g.self ? 'self' : '') });
  }

  return { role: 'gateway', update };
}

// Two clicks within 5 s: the first arms, the second revokes.
function revokeButton(tr) {
  const b = h('button', { type: 'button', class: 'small danger', testid: 'lease-revoke' }, 'revoke');
  let timer = null;
  const disarm = () => { clearTimeout(timer); timer = null; b.textContent = 'revoke'; b.className = 'small danger'; };
  b.addEventListener('click', async () => {
    if (!timer) {
      b.textContent = 'confirm revoke';
      b.className = 'small armed';
      timer = setTimeout(disarm, 5000);
      return;
    }
    disarm();
    const l = tr.item;
    await act(b, `Revoked the lease of tunnel ${l.tunnel} (port ${l.port})`, 'DELETE',
      `/v1/leases?agent=${encodeURIComponent(l.agent)}&tunnel=${encodeURIComponent(l.tunnel)}`);
  });
  return b;
}

function liftButton(tr) {
  const b = h('button', { type: 'button', class: 'small', testid: 'ban-lift' }, 'lift');
  b.addEventListener('click', () => {
    const target = tr.item.target;
    act(b, `Lifted the ban on ${target}`, 'DELETE', `/v1/blacklist?target=${encodeURIComponent(target)}`);
  });
  return b;
}

function capsText(c) {
  if (!c) return '—';
  return `in ${fmtCap(c.inbound)} · out ${fmtCap(c.outbound)} · burst ${fmtBurst(c.burst)}`;
}

function agentCard(id) {
  const dd = () => h('dd');
  const f = { remote: h('dd', { class: 'mono' }), since: dd(), lanes: dd(), caps: dd() };

  const tunnels = makeTable([
    { label: 'tunnel' }, { label: 'port', cls: 'num' }, { label: 'conns (live / total)', cls: 'num' },
    { label: 'inbound', cls: 'num' }, { label: 'outbound', cls: 'num' }, { label: 'caps' },
  ], { empty: 'no tunnel' });
  const conns = makeTable([
    { label: 'source', cls: 'mono' }, { label: 'peer', cls: 'mono' }, { label: 'tunnel' }, { label: 'port', cls: 'num' },
    { label: 'age' }, { label: 'inbound', cls: 'num' }, { label: 'outbound', cls: 'num' },
  ], { empty: 'no live connection' });

  const input = (testid, what) => h('input', { testid, inputmode: 'text', autocomplete: 'off', spellcheck: 'false', 'aria-label': what });
  const capIn = input('caps-inbound', 'inbound cap');
  const capOut = input('caps-outbound', 'outbound cap');
  const capBurst = input('caps-burst', 'burst');
  const submit = h('button', { type: 'submit', class: 'primary', testid: 'caps-submit' }, 'Set caps');
  const clear = h('button', { type: 'button', testid: 'caps-clear', title: 'back to the configured caps' }, 'Clear');
  const note = h('span', { class: 'note' });
  const form = h('form', { class: 'row', autocomplete: 'off' },
    h('label', null, 'inbound, bytes/s', capIn),
    h('label', null, 'outbound, bytes/s', capOut),
    h('label', null, 'burst, bytes', capBurst),
    h('div', { class: 'buttons' }, submit, clear, note),
    h('p', { class: 'hint' }, '0 = uncapped. Suffixes: K, M, G (×1000), Ki, Mi, Gi (×1024). An empty field keeps the current value. Clear goes back to the configured caps.'));

  let current = { inbound: 0, outbound: 0, burst: 0 };
  const path = () => `/v1/agents/caps?agent=${encodeURIComponent(id)}`;
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    let body;
    try {
      const v = (el, k) => { const n = parseRate(el.value); return n == null ? current[k] : n; };
      body = { inbound: v(capIn, 'inbound'), outbound: v(capOut, 'outbound'), burst: v(capBurst, 'burst') };
    } catch (e) {
      showMessage('err', e.message);
      return;
    }
    act(submit, `Caps set for ${shortId(id)}`, 'PUT', path(), body, () => {
      capIn.value = capOut.value = capBurst.value = '';
    }, note);
  });
  clear.addEventListener('click', () => act(clear, `Caps cleared for ${shortId(id)}`, 'DELETE', path(), undefined, null, note));

  const el = h('section', { class: 'card agent', testid: `agent-${id}` },
    h('div', { class: 'card-head' }, h('h3', null, 'Agent ', h('code', { title: id }, id))),
    kv([['remote address', f.remote], ['connected', f.since], ['lanes', f.lanes], ['caps', f.caps]]),
    h('h4', null, 'Tunnels'), tunnels.root,
    h('h4', null, 'Live connections'), conns.root,
    h('h4', null, 'Bandwidth caps'), form);

  function update(a) {
    current = Object.assign({ inbound: 0, outbound: 0, burst: 0 }, a.caps || {});
    setText(f.remote, a.remote_addr || '—');
    const since = ago(a.since);
    setVal(f.since, { text: a.since == null ? '—' : `${since.text} (${fmtDuration(nowSecs() - a.since)})`, title: since.title });
    setText(f.lanes, num(a.lanes));
    const src = a.caps && a.caps.source === 'admin' ? 'set by an operator' : 'from the configuration';
    setText(f.caps, a.caps ? `${capsText(a.caps)} (${src})` : '—');
    setAttr(capIn, 'placeholder', `now ${current.inbound}`);
    setAttr(capOut, 'placeholder', `now ${current.outbound}`);
    setAttr(capBurst, 'placeholder', `now ${current.burst}`);

    syncRows(tunnels, a.tunnels || [], (t) => t.name, (t) => [
      t.name, t.port == null ? '—' : String(t.port),
      `${num(t.connections_active)} / ${num(t.connections_total)}`,
      fmtBytes(t.bytes_inbound), fmtBytes(t.bytes_outbound), capsText(t.caps),
    ], { testid: (t) => `tunnel-${t.name}` });

    syncRows(conns, a.connections || [], (c) => c.id, (c) => [
      c.source || '—', c.peer ? idVal(c.peer) : '—', c.tunnel, c.port == null ? '—' : String(c.port),
      age(c.since), fmtBytes(c.bytes_inbound), fmtBytes(c.bytes_outbound),
    ], { testid: () => 'conn' });
  }

  return { el, update };
}

// ---------------------------------------------------------------- agent view

function agentView() {
  const root = byId('view');
  const dd = () => h('dd');

  const tiles = {
    session: tile('tile-session', 'gateway session'),
    tunnels: tile('tile-tunnels', 'tunnels'),
    peers: tile('tile-peers', 'peers'),
    reach: tile('tile-reachability', 'reachability'),
  };

  const sess = { gateway: h('dd', { class: 'mono' }), address: h('dd', { class: 'mono' }), since: dd() };
  const sessKv = kv([['gateway', sess.gateway], ['address', sess.address], ['since', sess.since]]);
  const noSession = h('p', { class: 'empty muted' }, 'no session');
  const sessions = makeTable([{ label: 'gateway', cls: 'mono' }, { label: 'address', cls: 'lines' }, { label: 'since' }], { empty: 'no session' });
  const fleet = makeTable([{ label: 'gateway', cls: 'mono' }, { label: 'addresses', cls: 'lines' }, { label: 'session' }], { empty: 'no gateway known' });
  const sessionsBox = h('div', null, h('h4', null, 'Sessions'), sessions.root);
  const fleetBox = h('div', null, h('h4', null, 'Gateway fleet'), fleet.root);
  const sessionCard = h('section', { class: 'card', testid: 'agent-session' },
    h('h2', null, 'Gateway session'), noSession, sessKv, sessionsBox, fleetBox);

  const tunnels = makeTable([
    { label: 'tunnel' }, { label: 'target', cls: 'mono' }, { label: 'port', cls: 'num' },
    { label: 'addresses', cls: 'lines' }, { label: 'error', cls: 'err' },
  ], { empty: 'no tunnel' });

  const advertise = makeAddrList('advertise', 'nothing to advertise yet');
  const circuits = makeAddrList('circuits', 'no circuit address yet');

  const peers = makeTable([
    { label: 'peer', cls: 'mono' }, { label: 'relayed', cls: 'num' }, { label: 'direct', cls: 'num' },
    { label: 'hole punch' }, { label: 'via' }, { label: 'direct after', cls: 'num' }, { label: 'became' },
    { label: 'dial failures', cls: 'num' }, { label: 'started' },
  ], { testid: 'holepunch', empty: 'no peer' });

  // doctor
  const docStatus = h('span', { class: 'badge none' }, 'not run yet');
  const docWhen = h('span', { class: 'muted small' });
  const docChecks = h('ul', { class: 'checks' });
  const docRun = h('button', { type: 'button', testid: 'doctor-run' }, 'Run checks');
  const docCard = h('section', { class: 'card', testid: 'doctor' },
    h('div', { class: 'card-head' }, h('h2', null, 'Doctor'), docRun),
    h('div', null, docStatus, ' ', docWhen),
    docChecks);
  let posted = null; // the doctor report that POST /v1/doctor answered
  let lastEvent = null;
  docRun.addEventListener('click', async () => {
    docRun.textContent = 'running…';
    const res = await act(docRun, 'Doctor finished', 'POST', '/v1/doctor', undefined, (r) => {
      try {
        posted = JSON.parse(r.text);
        showMessage(posted.healthy ? 'ok' : 'warn', posted.healthy ? 'Doctor: healthy' : 'Doctor: unhealthy, see the failed checks');
      } catch (_) { /* keep the plain message */ }
    });
    docRun.textContent = 'Run checks';
    if (res && lastEvent) renderDoctor(lastEvent.doctor);
  });

  function renderDoctor(fromEvent) {
    let d = fromEvent || null;
    if (posted && (!d || (posted.ran_at || 0) > (d.ran_at || 0))) d = posted;
    if (!d) {
      setText(docStatus, 'not run yet'); setClass(docStatus, 'badge none');
      setText(docWhen, '');
      docChecks.replaceChildren();
      return;
    }
    setText(docStatus, d.healthy ? 'healthy' : 'unhealthy');
    setClass(docStatus, d.healthy ? 'badge ok' : 'badge bad');
    const when = ago(d.ran_at);
    setVal(docWhen, { text: `ran ${when.text}`, title: when.title });
    const key = JSON.stringify(d.checks || []);
    if (docChecks.dataset.key !== key) {
      docChecks.dataset.key = key;
      docChecks.replaceChildren(...(d.checks || []).map((c) => h('li', null,
        h('span', { class: c.ok ? 'badge ok' : 'badge bad' }, c.ok ? 'ok' : 'fail'),
        h('div', { class: 'what' }, h('div', null, c.name), c.detail ? h('div', { class: 'detail' }, c.detail) : null))));
    }
  }

  root.append(
    h('div', { class: 'tiles' }, Object.values(tiles).map((t) => t.el)),
    sessionCard,
    card('Tunnels', tunnels.root),
    h('div', { class: 'grid' },
      card('Advertise these addresses', advertise.root),
      card('Circuit addresses', circuits.root)),
    card('Peers and hole punching', peers.root),
    docCard,
  );

  function update(d) {
    lastEvent = d;
    header('relaygate agent', d);
    const adv = d.advertise || {};
    const s = adv.session || null;
    const tuns = adv.tunnels || [];
    setVal(tiles.session.value, s ? idVal(s.gateway) : 'none', s ? 'value id' : 'value');
    setText(tiles.session.sub, s ? `since ${ago(s.since).text}` : '');
    setText(tiles.tunnels.value, num(tuns.length));
    const failing = tuns.filter((t) => t.error).length;
    setText(tiles.tunnels.sub, failing ? `${failing} failing` : '');
    setText(tiles.peers.value, num((d.peers || []).length));
    setText(tiles.reach.value, adv.reachability || 'unknown');

    noSession.hidden = !!s;
    sessKv.hidden = !s;
    if (s) {
      setText(sess.gateway, s.gateway || '—');
      setText(sess.address, s.address || '—');
      setVal(sess.since, ago(s.since));
    }
    const list = adv.sessions || [];
    sessionsBox.hidden = list.length < 2; // one session is already shown above
    syncRows(sessions, list, (x) => `${x.gateway}\u0000${x.address}`, (x) => [idVal(x.gateway), x.address || '—', ago(x.since)]);
    const fl = adv.fleet || [];
    fleetBox.hidden = fl.length === 0;
    syncRows(fleet, fl, (g) => g.gateway, (g) => [idVal(g.gateway), (g.addresses || []).join('\n') || '—', yesNo(g.session)]);

    syncRows(tunnels, tuns, (t) => t.name, (t) => [
      t.name, t.target || '—', t.port == null ? '—' : String(t.port),
      (t.addresses || []).join('\n') || '—', t.error ? { text: t.error } : { text: '—', cls: 'muted' },
    ], { testid: (t) => `tunnel-${t.name}` });

    syncAddrList(advertise, tuns.flatMap((t) => t.addresses || []));
    syncAddrList(circuits, [...(adv.circuit || []), ...tuns.flatMap((t) => t.circuits || [])]);

    syncRows(peers, d.peers || [], (p) => p.peer, (p) => {
      const hp = p.holepunch;
      return [
        idVal(p.peer), num(p.relayed_connections), num(p.direct_connections),
        hp ? { text: hp.result || 'pending', cls: hp.result === 'success' ? 'ok-text' : hp.result ? 'err-text' : '' } : '—',
        hp ? hp.transport || '—' : '—',
        hp && hp.direct_after_ms != null ? `${num(hp.direct_after_ms)} ms` : '—',
        hp ? hp.direct_transport || '—' : '—',
        hp ? num(hp.dial_failures) : '—',
        hp && hp.started_ms != null ? ago(hp.started_ms / 1000) : '—',
      ];
    });

    renderDoctor(d.doctor);
  }

  return { role: 'agent', update };
}

// ---------------------------------------------------------------- start

function start() {
  initTokenForm();
  byId('message-close').addEventListener('click', () => { byId('message').hidden = true; });
  setLive(false);
  streamEvents();
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
else start();
