// A shell on the node as the job's user: xterm.js over the agent's WebSocket PTY.
// Binary frames carry terminal bytes both ways; text frames carry JSON control ({"resize": [cols, rows]}).

import { wsUrl, withQuery } from './api.js';
import { clear, h, icon } from './util.js';

export async function render(body, { node, base, signal }) {
  const [{ Terminal }, { FitAddon }] = await Promise.all([
    importRetrying('../vendor/xterm/xterm.mjs', signal), importRetrying('../vendor/xterm/addon-fit.mjs', signal)]);
  if (signal.aborted) return;
  if (!document.querySelector('link[data-xterm]')) {
    document.head.append(h('link', { rel: 'stylesheet', href: 'vendor/xterm/xterm.css', 'data-xterm': '1' }));
  }
  const pill = h('span', { class: 'pill' });
  const reconnect = h('button', { class: 'btn', type: 'button', hidden: true }, icon('refresh'), 'Reconnect');
  const interrupt = h('button', { class: 'btn', type: 'button', title: 'Send SIGINT to the foreground process' }, 'Ctrl-C');
  const screen = h('div', { class: 'term-screen', 'data-testid': 'terminal' });
  clear(body, 
    h('div', { class: 'toolbar' },
      h('div', { class: 'muted' }, `A shell on ${node}, in the job's environment, as the job's user.`),
      h('div', { class: 'toolbar-right' }, interrupt, reconnect, pill)),
    h('section', { class: 'term-card' }, screen));

  const term = new Terminal({
    cursorBlink: true, fontSize: 14, scrollback: 5000, allowProposedApi: false,
    fontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    theme: { background: '#0f172a', foreground: '#e2e8f0', cursor: '#93c5fd', selectionBackground: '#334155' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  fit.fit();
  term.focus();

  const encoder = new TextEncoder();
  let ws = null;
  const setPill = (kind, text) => { pill.className = `pill pill-${kind}`; pill.textContent = text; };
  const send = (data) => { if (ws && ws.readyState === WebSocket.OPEN) ws.send(data); };
  const sendSize = () => send(JSON.stringify({ resize: [term.cols, term.rows] }));

  function connect() {
    reconnect.hidden = true;
    setPill('connecting', 'connecting');
    ws = new WebSocket(wsUrl(withQuery(`${base}/api/shell`, { cols: term.cols, rows: term.rows })));
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => { setPill('live', 'connected'); sendSize(); term.focus(); };
    ws.onmessage = (e) => {
      if (typeof e.data === 'string') {
        control(e.data);
      } else {
        term.write(new Uint8Array(e.data));
      }
    };
    ws.onclose = (e) => {
      if (signal.aborted) return;
      setPill('ended', 'closed');
      const why = e.code === 1000 || e.code === 1005 ? 'the shell exited' : `connection closed (${e.code}${e.reason ? `: ${e.reason}` : ''})`;
      term.write(`\r\n\x1b[2m[${why}]\x1b[0m\r\n`);
      reconnect.hidden = false;
    };
  }

  function control(text) {
    let msg;
    try { msg = JSON.parse(text); } catch (_) { term.write(text); return; }
    if (msg && msg.exit !== undefined) term.write(`\r\n\x1b[2m[the shell exited with code ${msg.exit}]\x1b[0m\r\n`);
    else if (msg && msg.error) term.write(`\r\n\x1b[31m[${msg.message || msg.error}]\x1b[0m\r\n`);
  }

  term.onData((data) => send(encoder.encode(data)));
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
  term.onResize(() => sendSize());
  const onResize = () => fit.fit();
  const observer = new ResizeObserver(onResize);
  observer.observe(screen);
  reconnect.addEventListener('click', () => { term.reset(); connect(); });
  interrupt.addEventListener('click', () => { send(JSON.stringify({ signal: 'INT' })); term.focus(); });
  signal.addEventListener('abort', () => {
    observer.disconnect();
    if (ws) ws.close(1000);
    term.dispose();
  });
  connect();
}

// xterm.js is loaded when a terminal is first opened. The browser remembers a failed module load
// (the master may have been restarting), so a retry asks under another URL.
async function importRetrying(url, signal) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await import(attempt ? `${url}?retry=${attempt}` : url);
    } catch (e) {
      if (attempt >= 4 || signal.aborted) throw e;
      await new Promise((resolve) => { setTimeout(resolve, 1000 * (attempt + 1)); });
    }
  }
}
