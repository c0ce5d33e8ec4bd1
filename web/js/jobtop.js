// The job page: every node of a job at a glance, like `dxflow top JOB` — one row per node (state, the
// job's CPU in % of its cores there, cores busy, memory and limit, load, GPU use, processes), a row for
// the whole job, and each node's busiest processes. Refreshed every 2 s from the master's /api/top/JOB,
// which asks all nodes at once and names a node that does not answer as lost.

import { api } from './api.js';
import { nodeHref } from './fleet.js';
import { badge, bytes, clear, every, h, icon, meter } from './util.js';

const POLL_MS = 2000;
const PROCESSES = 3;
const SORTS = [['cpu', 'CPU'], ['memory', 'Memory'], ['node', 'Node'], ['gpu', 'GPU']];

export function jobHref(job) {
  return `#/job/${encodeURIComponent(job)}`;
}

const cpuPercent = (r) => (r.cpu_cores === undefined || r.cpu_cores === null || !r.cores ? null : 100 * r.cpu_cores / r.cores);

function gpuPercent(r) {
  const u = (r.gpus || []).map((g) => g.utilization).filter((x) => x !== null && x !== undefined);
  return u.length ? u.reduce((a, b) => a + b, 0) / u.length : null;
}

const FIGURE = { cpu: (r) => r.cpu_cores, memory: (r) => r.memory_bytes, gpu: gpuPercent };
const byName = (a, b) => a.node.localeCompare(b.node, undefined, { numeric: true });

// The busiest first (nodes that did not answer last), or by node name: as `dxflow top` sorts.
function sortRows(rows, sort) {
  if (sort === 'node') return [...rows].sort(byName);
  const value = (r) => (r.state === 'ready' ? FIGURE[sort](r) : null);
  return [...rows].sort((a, b) => {
    const va = value(a);
    const vb = value(b);
    if (va === null || va === undefined) return vb === null || vb === undefined ? byName(a, b) : 1;
    if (vb === null || vb === undefined) return -1;
    return vb - va || byName(a, b);
  });
}

const num = (x, d) => (x === null || x === undefined ? '–' : x.toFixed(d));

function nodeRow(job, r) {
  const ready = r.state === 'ready';
  const pct = cpuPercent(r);
  const gpu = gpuPercent(r);
  return h('tr', { class: `state-${r.state}`, dataset: { node: r.node } },
    h('td', { class: 'cell-node' }, h('a', { href: nodeHref(job, r.node), class: 'node-link' }, icon('server'), r.node)),
    h('td', {}, badge(r.state), !ready && r.error ? h('div', { class: 'state-detail', title: r.error }, r.error) : null),
    h('td', { class: 'cell-meter' }, ready && pct !== null ? meter(pct / 100, `${pct.toFixed(1)}%`) : '–'),
    h('td', { class: 'num' }, ready && r.cpu_cores !== undefined ? `${r.cpu_cores.toFixed(2)}/${r.cores}` : '–'),
    h('td', { class: 'cell-meter' }, !ready ? '–' : r.memory_limit_bytes
      ? meter(r.memory_bytes / r.memory_limit_bytes, `${bytes(r.memory_bytes)} / ${bytes(r.memory_limit_bytes)}`, 'meter-wide')
      : bytes(r.memory_bytes)),
    h('td', { class: 'num' }, ready && r.load ? r.load[0].toFixed(2) : '–'),
    h('td', { class: 'num' }, ready && gpu !== null ? `${gpu.toFixed(0)}%${r.gpus.length > 1 ? ` ×${r.gpus.length}` : ''}` : '–'),
    h('td', { class: 'num' }, ready ? String(r.process_count) : '–'));
}

function totalRow(data, rows) {
  const ready = rows.filter((r) => r.state === 'ready');
  const sum = (f) => ready.reduce((a, r) => a + (f(r) || 0), 0);
  const cores = sum((r) => r.cores);
  const busy = sum((r) => r.cpu_cores);
  const limits = ready.every((r) => r.memory_limit_bytes) ? sum((r) => r.memory_limit_bytes) : 0;
  const loads = ready.filter((r) => r.load).map((r) => r.load[0]);
  const gpus = ready.map(gpuPercent).filter((x) => x !== null);
  const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null);
  return h('tr', { class: 'top-total' },
    h('td', { class: 'strong' }, data.node_set || '–'),
    h('td', {}, `${ready.length}/${rows.length} up`),
    h('td', { class: 'num' }, cores ? `${(100 * busy / cores).toFixed(1)}%` : '–'),
    h('td', { class: 'num' }, ready.length ? `${busy.toFixed(2)}/${cores}` : '–'),
    h('td', { class: 'num' }, ready.length ? `${bytes(sum((r) => r.memory_bytes))}${limits ? ` / ${bytes(limits)}` : ''}` : '–'),
    h('td', { class: 'num' }, num(mean(loads), 2)),
    h('td', { class: 'num' }, gpus.length ? `${mean(gpus).toFixed(0)}%` : '–'),
    h('td', { class: 'num' }, ready.length ? String(sum((r) => r.process_count)) : '–'));
}

function processRows(rows) {
  const out = [];
  for (const r of rows) {
    if (r.state !== 'ready') continue;
    for (const p of (r.processes || []).slice(0, PROCESSES)) {
      out.push(h('tr', { dataset: { node: r.node, pid: String(p.pid) } },
        h('td', {}, r.node), h('td', { class: 'num' }, String(p.pid)), h('td', {}, p.user),
        h('td', { class: 'num' }, `${p.cpu_percent.toFixed(1)}%`), h('td', { class: 'num' }, bytes(p.memory_bytes)),
        h('td', { class: 'cell-command' }, h('code', { title: p.command }, p.command))));
    }
  }
  return out;
}

const thead = (cols, nums) => h('thead', {}, h('tr', {}, cols.map((c, i) => h('th', { class: nums.includes(i) ? 'num' : null }, c))));

export function renderJob(view, job, signal) {
  let sort = 'cpu';
  let data = null;
  const error = h('div', { class: 'alert alert-error', hidden: true });
  const stamp = h('span', { class: 'muted' });
  const sorter = h('div', { class: 'tabs', role: 'group', 'aria-label': 'Sort nodes by' });
  const nodesBody = h('tbody');
  const procsBody = h('tbody');
  clear(view,
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, `Job ${job}`),
        h('p', { class: 'muted' }, 'Every node of the job now, as ', h('code', {}, `dxflow top ${job}`), ' shows it. ', stamp)),
      h('div', { class: 'live' }, h('span', { class: 'live-dot' }), 'live')),
    error, sorter,
    h('section', { class: 'card job' }, h('div', { class: 'table-wrap' }, h('table', { class: 'table nodes job-top' },
      thead(['Node', 'State', 'CPU', 'Cores', 'Memory', 'Load', 'GPU', 'Processes'], [3, 5, 6, 7]), nodesBody))),
    h('section', { class: 'card job' },
      h('header', { class: 'job-head' }, h('div', { class: 'job-title' }, h('h2', {}, 'Busiest processes')),
        h('span', { class: 'muted' }, `the job's top ${PROCESSES} on each node; CPU as top shows it: 100% is one core`)),
      h('div', { class: 'table-wrap' }, h('table', { class: 'table job-processes' },
        thead(['Node', 'PID', 'User', 'CPU', 'Memory', 'Command'], [1, 3, 4]), procsBody))));

  const draw = () => {
    clear(sorter, SORTS.map(([key, label]) => h('button', { type: 'button', class: key === sort ? 'tab tab-active' : 'tab',
      'aria-pressed': key === sort ? 'true' : 'false', onclick: () => { sort = key; draw(); poll(); } }, label)));
    if (!data) return;
    const rows = sortRows(data.nodes, sort);
    clear(nodesBody, rows.map((r) => nodeRow(job, r)), totalRow(data, rows));
    clear(procsBody, processRows(rows));
    stamp.textContent = `Updated ${new Date(data.time * 1000).toLocaleTimeString()}.`;
  };

  const poll = async () => {
    try {
      data = await api(`/api/top/${encodeURIComponent(job)}?processes=${PROCESSES}&sort=${sort === 'memory' ? 'memory' : 'cpu'}`, { signal });
      error.hidden = true;
    } catch (e) {
      if (e.name === 'AbortError') return;
      error.textContent = `Cannot read job ${job}: ${e.message}`;
      error.hidden = false;
    }
    draw();
  };
  draw();
  every(POLL_MS, poll, signal);
}
