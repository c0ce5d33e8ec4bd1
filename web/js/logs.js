// The job's logs (stdout, stderr, the agent's own) following live over server-sent events,
// with pause and search.

import { api, withQuery } from './api.js';
import { bytes, clear, h, icon } from './util.js';

const KEEP_LINES = 20000;
const FIRST_LINES = 1000;

export async function render(body, { job, node, base, params, signal }) {
  const picker = h('div', { class: 'segmented', role: 'group', 'aria-label': 'Log' });
  const pauseBtn = h('button', { class: 'btn', type: 'button', 'data-testid': 'pause' });
  const search = h('input', { class: 'input search-input', type: 'search', placeholder: 'Search', 'aria-label': 'Search the log',
    spellcheck: 'false' });
  const onlyMatches = h('input', { type: 'checkbox', checked: true });
  const count = h('span', { class: 'muted log-count' });
  const pill = h('span', { class: 'pill' });
  const out = h('div', { class: 'log', role: 'log', 'aria-live': 'off', tabindex: '0' });
  const jump = h('button', { class: 'btn btn-small jump', type: 'button', hidden: true }, 'Jump to the end');
  const error = h('div', { class: 'alert alert-error', hidden: true });
  clear(body, 
    h('div', { class: 'toolbar' }, picker,
      h('div', { class: 'toolbar-right' },
        h('div', { class: 'search' }, icon('search'), search),
        h('label', { class: 'check' }, onlyMatches, 'matching lines only'),
        pauseBtn, pill)),
    error,
    h('section', { class: 'card log-card' }, out, jump, h('div', { class: 'log-foot' }, count)));

  let logs = [];
  try {
    logs = await api(`${base}/api/logs`, { signal });
  } catch (e) {
    if (e.name === 'AbortError') return;
    error.textContent = `Cannot list the logs: ${e.message}`;
    error.hidden = false;
    return;
  }
  const wanted = params.get('name');
  const current = logs.find((l) => l.name === wanted) || logs.find((l) => l.name === 'stdout' && l.path)
    || logs.find((l) => l.exists) || logs[0] || {};
  const { name } = current;
  clear(picker, logs.map((l) => h('a', { class: l.name === name ? 'seg seg-active' : 'seg', title: l.path,
    href: `#/node/${encodeURIComponent(job)}/${encodeURIComponent(node)}/logs?name=${encodeURIComponent(l.name)}` },
  l.name, h('span', { class: 'seg-note' }, l.same_as ? `= ${l.same_as}` : l.exists === false ? 'not yet' : bytes(l.size)))));
  if (!name || !current.path) {
    out.append(h('div', { class: 'log-empty' }, name
      ? `The scheduler does not say where this job writes its ${name}: there is nothing to follow.`
      : 'This job has no logs on this node.'));
    return;
  }

  const lines = [];        // every line kept, shown or not
  let pending = [];        // lines that came while paused
  let paused = false;
  let ended = false;
  let stick = true;        // follow the end unless the reader scrolled up
  let source = null;
  let retry = null;
  let term = '';

  let link = 'connecting'; // connecting, live or broken
  const setPill = (kind, text) => { pill.className = `pill pill-${kind}`; pill.textContent = text; };
  const drawPause = () => {
    clear(pauseBtn, icon(paused ? 'play' : 'pause'), paused ? 'Resume' : 'Pause');
    const held = pending.length ? ` \u00b7 ${pending.length} new` : '';
    if (ended) setPill('ended', 'ended');
    else if (link === 'broken') setPill('lost', `reconnecting${held}`);
    else if (paused) setPill('paused', `paused${held}`);
    else if (link === 'connecting') setPill('connecting', 'connecting');
    else setPill('live', 'live');
  };

  function lineEl(text) {
    const el = h('div', { class: 'log-line' });
    if (term) {
      const lower = text.toLowerCase();
      let at = 0;
      let i = lower.indexOf(term);
      while (i >= 0) {
        el.append(text.slice(at, i), h('mark', {}, text.slice(i, i + term.length)));
        at = i + term.length;
        i = lower.indexOf(term, at);
      }
      el.append(text.slice(at));
    } else {
      el.textContent = text;
    }
    return el;
  }

  const shows = (text) => !term || !onlyMatches.checked || text.toLowerCase().includes(term);

  function redraw() {
    clear(out);
    const frag = document.createDocumentFragment();
    for (const text of lines) if (shows(text)) frag.append(lineEl(text));
    out.append(frag);
    updateCount();
    if (stick) out.scrollTop = out.scrollHeight;
  }

  function updateCount() {
    const matching = term ? lines.filter((t) => t.toLowerCase().includes(term)).length : null;
    count.textContent = term ? `${matching} of ${lines.length} lines match` : `${lines.length} lines`;
  }

  function add(batch) {
    for (const text of batch) lines.push(text);
    let trimmed = false;
    if (lines.length > KEEP_LINES) { lines.splice(0, lines.length - KEEP_LINES); trimmed = true; }
    if (trimmed) { redraw(); return; }
    const frag = document.createDocumentFragment();
    for (const text of batch) if (shows(text)) frag.append(lineEl(text));
    out.append(frag);
    updateCount();
    if (stick) out.scrollTop = out.scrollHeight;
  }

  let queue = [];
  let scheduled = false;
  function receive(text) {
    if (paused) {
      pending.push(text);
      drawPause();
      return;
    }
    queue.push(text);
    if (!scheduled) {
      scheduled = true;
      requestAnimationFrame(() => { scheduled = false; const b = queue; queue = []; add(b); });
    }
  }

  let lastId = '';         // byte offset after the last line received: where to resume

  // The browser reconnects by itself after a broken stream, resuming at Last-Event-ID; when the server
  // refused the stream (node lost, 502) the console reconnects later, from the last offset it saw.
  function connect() {
    const query = lastId ? { offset: lastId } : { lines: FIRST_LINES };
    source = new EventSource(withQuery(`${base}/api/logs/${encodeURIComponent(name)}/follow`, query));
    source.onopen = () => { error.hidden = true; link = 'live'; drawPause(); };
    source.onmessage = (e) => { if (e.lastEventId) lastId = e.lastEventId; receive(e.data); };
    source.addEventListener('end', () => {
      ended = true;
      source.close();
      drawPause();
      receiveMarker(`\u2014 job ${job} has ended: this is the whole ${name} log \u2014`);
    });
    source.onerror = () => {
      if (ended || signal.aborted) return;
      link = 'broken';
      drawPause();
      error.textContent = 'The log stream broke (the node may be unreachable). Reconnecting\u2026';
      error.hidden = false;
      if (source.readyState === EventSource.CLOSED) {  // refused: ask why, then try again later
        api(withQuery(`${base}/api/logs/${encodeURIComponent(name)}`, { lines: 0 }), { signal })
          .then(() => {}, (e) => {
            if (e.name !== 'AbortError') error.textContent = `${e.message}. Trying again\u2026`;
          });
        retry = setTimeout(connect, 3000);
      }
    };
  }

  function receiveMarker(text) {
    const el = h('div', { class: 'log-marker' }, text);
    out.append(el);
    if (stick) out.scrollTop = out.scrollHeight;
  }

  pauseBtn.addEventListener('click', () => {
    paused = !paused;
    if (!paused) {
      const b = pending;
      pending = [];
      add(b);
    }
    drawPause();
  });
  let debounce = null;
  search.addEventListener('input', () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { term = search.value.trim().toLowerCase(); redraw(); }, 120);
  });
  onlyMatches.addEventListener('change', redraw);
  out.addEventListener('scroll', () => {
    stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    jump.hidden = stick;
  });
  jump.addEventListener('click', () => { stick = true; out.scrollTop = out.scrollHeight; jump.hidden = true; });
  signal.addEventListener('abort', () => { clearTimeout(retry); if (source) source.close(); });

  drawPause();
  connect();
}
