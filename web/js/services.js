// The job's web services on this node: the TCP ports its processes listen on, each opened on an origin
// of its own (http://pPORT-NODE-JOB.localhost:…/) through /console/open, never on the console's origin.

import { api } from './api.js';
import { clear, every, h, icon } from './util.js';

const POLL_MS = 5000;

export async function render(body, { job, node, base, signal }) {
  const tbody = h('tbody');
  const table = h('table', { class: 'table services' },
    h('colgroup', {}, ['10%', '14%', '52%', '10%', '14%'].map((w) => h('col', { style: `width:${w}` }))),
    h('thead', {}, h('tr', {}, h('th', {}, 'Port'), h('th', {}, 'Address'), h('th', {}, 'Process'),
      h('th', { class: 'num' }, 'PID'), h('th', {}, ''))), tbody);
  const empty = h('div', { class: 'empty', hidden: true },
    h('div', { class: 'empty-icon' }, icon('globe')),
    h('h2', {}, 'No web services on this node'),
    h('p', {}, 'None of the job\u2019s processes listens on a TCP port here. Start one, for example ',
      h('code', {}, 'python3 -m http.server 8000'), ', Jupyter or TensorBoard, and it appears here.'));
  const error = h('div', { class: 'alert alert-error', hidden: true });
  clear(body, 
    h('div', { class: 'toolbar' },
      h('div', { class: 'muted' }, `Ports the job's processes listen on, on ${node}. Each opens in a new tab, on an address of its own, through the dxflow proxy.`),
      h('div', { class: 'toolbar-right' }, h('div', { class: 'live' }, h('span', { class: 'live-dot' }), 'live'))),
    error,
    h('section', { class: 'card' }, h('div', { class: 'table-wrap' }, table), empty));

  const poll = async () => {
    let ports;
    try {
      ports = await api(`${base}/api/ports`, { signal });
      error.hidden = true;
    } catch (e) {
      if (e.name === 'AbortError') return;
      error.textContent = `Cannot list the node's ports: ${e.message}`;
      error.hidden = false;
      return;
    }
    ports.sort((a, b) => a.port - b.port);
    table.hidden = !ports.length;
    empty.hidden = !!ports.length;
    clear(tbody, ports.map((p) => {
      const href = `/console/open?${new URLSearchParams({ job, node, port: p.port })}`;
      return h('tr', { dataset: { port: p.port } },
        h('td', { class: 'strong port' }, String(p.port)),
        h('td', { class: 'mono muted' }, p.address || ''),
        h('td', {}, h('div', { class: 'strong' }, p.process || ''),
          p.command ? h('div', { class: 'mono muted command', title: p.command }, p.command) : null),
        h('td', { class: 'num muted' }, p.pid ? String(p.pid) : ''),
        h('td', { class: 'cell-actions' }, h('a', { class: 'btn btn-small', href, target: '_blank', rel: 'noopener',
          'aria-label': `Open port ${p.port}` }, icon('external'), 'Open')));
    }));
  };
  every(POLL_MS, poll, signal);
}
