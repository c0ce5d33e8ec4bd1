// The fleet: the user's jobs and their nodes, with state, uptime, CPU and memory, updated live.

import { api, nodeBase } from './api.js';
import { jobHref } from './jobtop.js';
import { badge, bytes, clear, duration, every, h, icon, meter } from './util.js';

const POLL_MS = 2000;
const METRICS_MS = 3000;
const LIVE_METRICS_MAX = 48;  // beyond this many nodes, the master's cached figures are shown
const ENDED_SHOWN = 5;         // ended jobs listed by name

export const TABS = [
  ['overview', 'Metrics', 'chart'],
  ['files', 'Files', 'folder'],
  ['logs', 'Logs', 'logs'],
  ['terminal', 'Terminal', 'terminal'],
  ['services', 'Services', 'globe'],
];

export function nodeHref(job, node, tab = 'overview') {
  return `#/node/${encodeURIComponent(job)}/${encodeURIComponent(node)}/${tab}`;
}

function uptimeOf(agent) {
  const t = Date.parse(agent.started);
  return Number.isNaN(t) ? null : (Date.now() - t) / 1000;
}

export function renderFleet(view, signal) {
  const summary = h('div', { class: 'summary' });
  const list = h('div', { class: 'jobs' });
  const empty = h('div', { class: 'empty', hidden: true },
    h('div', { class: 'empty-icon' }, icon('server')),
    h('h2', {}, 'No running jobs with dxflow agents'),
    h('p', {}, 'Submit a job as usual (for example ', h('code', {}, 'sbatch job.sh'),
      '). Its nodes appear here as soon as their agents start.'));
  const error = h('div', { class: 'alert alert-error', hidden: true });
  clear(view, 
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', {}, 'Fleet'), h('p', { class: 'muted' }, 'Your jobs\u2019 nodes, reached through their agents.')),
      h('div', { class: 'live' }, h('span', { class: 'live-dot' }), 'live')),
    summary, error, empty, list);

  const endedBody = h('tbody');
  const endedCard = h('section', { class: 'card job ended-jobs', hidden: true },
    h('header', { class: 'job-head' }, h('div', { class: 'job-title' }, h('h2', {}, 'Ended recently')),
      h('span', { class: 'muted' }, 'kept here for a few minutes')),
    h('div', { class: 'table-wrap' }, h('table', { class: 'table' }, endedBody)));
  const metrics = new Map();   // "job/node" -> latest /api/node answer
  const jobs = new Map();      // job -> {card, tbody, rows: Map(node -> row)}
  let agents = [];

  const poll = async () => {
    try {
      agents = await api('/api/agents?all=1', { signal });
      error.hidden = true;
    } catch (e) {
      if (e.name === 'AbortError') return;
      error.textContent = `Cannot list the fleet: ${e.message}`;
      error.hidden = false;
      return;
    }
    draw();
  };

  const pollMetrics = async () => {
    const ready = agents.filter((a) => a.state === 'ready').slice(0, LIVE_METRICS_MAX);
    await Promise.all(ready.map(async (a) => {
      try {
        metrics.set(`${a.job}/${a.node}`, await api(`${nodeBase(a.job, a.node)}/api/node`, { signal }));
      } catch (_) { /* the fleet list shows the agent's state */ }
    }));
    draw();
  };

  function draw() {
    const byJob = new Map();
    for (const a of agents) {
      if (!byJob.has(a.job)) byJob.set(a.job, []);
      byJob.get(a.job).push(a);
    }
    const isEnded = (members) => members.every((a) => a.state === 'gone');
    const live = [...byJob.keys()].filter((j) => !isEnded(byJob.get(j)));
    const ended = [...byJob.keys()].filter((j) => isEnded(byJob.get(j)));
    const newest = (a, b) => b.localeCompare(a, undefined, { numeric: true });
    live.sort(newest);
    const lastSeen = (job) => Math.max(...byJob.get(job).map((a) => a.checked || 0));
    ended.sort((a, b) => lastSeen(b) - lastSeen(a));  // the most recently ended first
    empty.hidden = live.length > 0;
    const counts = { ready: 0, starting: 0, lost: 0, gone: 0 };
    for (const a of agents) counts[a.state] = (counts[a.state] || 0) + 1;
    clear(summary, 
      stat('Running jobs', live.length), stat('Nodes', agents.length - counts.gone), stat('Ready', counts.ready, 'ready'),
      stat('Starting', counts.starting, 'starting'), stat('Lost', counts.lost, 'lost'));
    for (const [job, card] of jobs) {
      if (!live.includes(job)) { card.card.remove(); jobs.delete(job); }
    }
    for (const job of live) {
      const members = byJob.get(job).sort((a, b) => a.node.localeCompare(b.node, undefined, { numeric: true }));
      let card = jobs.get(job);
      if (!card) {
        card = jobCard(job);
        jobs.set(job, card);
      }
      list.append(card.card);  // keeps the order
      updateJob(card, members);
    }
    endedCard.hidden = !ended.length;
    clear(endedBody, ended.slice(0, ENDED_SHOWN).map((job) => {
      const members = byJob.get(job);
      return h('tr', { class: 'state-gone', dataset: { job } },
        h('td', { class: 'strong' }, `Job ${job}`),
        h('td', {}, members.map((a) => a.node).sort().join(', ')),
        h('td', {}, badge('gone')),
        h('td', { class: 'muted' }, 'The job has ended; its agents have stopped.'));
    }), ended.length > ENDED_SHOWN
      ? h('tr', {}, h('td', { colspan: 4, class: 'muted' }, `and ${ended.length - ENDED_SHOWN} more (\`dxflow ls --all\`)`))
      : null);
    list.append(endedCard);
  }

  function updateJob(card, members) {
    const a0 = members[0];
    const gone = members.filter((a) => a.state === 'gone').length;
    card.meta.textContent = `${a0.scheduler} \u00b7 cluster ${a0.cluster} \u00b7 ${members.length} node${members.length > 1 ? 's' : ''}`;
    const lost = members.filter((a) => a.state === 'lost').length;
    card.status.textContent = lost ? 'degraded' : 'running';
    card.status.className = `badge ${lost ? 'badge-lost' : 'badge-ready'}`;
    card.note.hidden = !lost && !gone;
    card.note.textContent = lost ? `${lost} node(s) cannot be reached: dxflow keeps retrying through the SSH tunnel.`
      : gone ? `${gone} node(s) of this job have no agent any more.` : '';
    const seen = new Set();
    for (const a of members) {
      seen.add(a.node);
      let row = card.rows.get(a.node);
      if (!row) {
        row = nodeRow(a);
        card.rows.set(a.node, row);
      }
      card.tbody.append(row.tr);
      updateRow(row, a, metrics.get(`${a.job}/${a.node}`));
    }
    for (const [node, row] of card.rows) if (!seen.has(node)) { row.tr.remove(); card.rows.delete(node); }
  }

  every(POLL_MS, poll, signal);
  setTimeout(() => every(METRICS_MS, pollMetrics, signal), 300);
}

function stat(label, value, cls = '') {
  return h('div', { class: `stat ${cls ? `stat-${cls}` : ''}` }, h('div', { class: 'stat-value' }, String(value)),
    h('div', { class: 'stat-label' }, label));
}

function jobCard(job) {
  const meta = h('span', { class: 'muted' });
  const status = h('span', { class: 'badge' });
  const note = h('div', { class: 'alert alert-info job-note', hidden: true });
  const tbody = h('tbody');
  const card = h('section', { class: 'card job', dataset: { job } },
    h('header', { class: 'job-head' },
      h('div', { class: 'job-title' }, h('h2', {}, h('a', { href: jobHref(job), class: 'job-link', title: `every node of job ${job} now` }, `Job ${job}`)), status), meta),
    note,
    h('div', { class: 'table-wrap' }, h('table', { class: 'table nodes' },
      h('colgroup', {}, ['14%', '14%', '10%', '20%', '22%', '7%', '13%'].map((w) => h('col', { style: `width:${w}` }))),
      h('thead', {}, h('tr', {}, ['Node', 'State', 'Uptime', 'CPU', 'Memory', 'Load', ''].map((c, i) =>
        h('th', { class: i === 2 || i === 5 ? 'num' : null }, c)))),
      tbody)));
  return { card, tbody, meta, status, note, rows: new Map() };
}

function nodeRow(a) {
  const cells = {
    node: h('td', { class: 'cell-node' }),
    state: h('td'),
    uptime: h('td', { class: 'num' }),
    cpu: h('td', { class: 'cell-meter' }),
    mem: h('td', { class: 'cell-meter' }),
    load: h('td', { class: 'num' }),
    actions: h('td', { class: 'cell-actions' }),
  };
  const tr = h('tr', { dataset: { node: a.node } }, Object.values(cells));
  return { tr, cells, key: '' };
}

function updateRow(row, a, m) {
  const { cells } = row;
  const live = a.state === 'ready' || a.state === 'lost' || a.state === 'starting';
  const key = `${a.state}|${a.detail}`;
  if (row.key !== key) {
    row.key = key;
    row.tr.className = `state-${a.state}`;
    clear(cells.node, live
      ? h('a', { href: nodeHref(a.job, a.node), class: 'node-link' }, icon('server'), a.node)
      : h('span', { class: 'node-link' }, icon('server'), a.node));
    clear(cells.state, badge(a.state),
      a.state !== 'ready' && a.detail ? h('div', { class: 'state-detail', title: a.detail }, a.detail) : null);
    clear(cells.actions, live
      ? TABS.map(([tab, label, ic]) => h('a', { class: 'icon-btn', href: nodeHref(a.job, a.node, tab), title: label,
        'aria-label': `${label} of ${a.node}` }, icon(ic)))
      : h('span', { class: 'muted' }, a.state === 'gone' ? 'job ended' : ''));
  }
  const info = m || a;
  const gone = a.state === 'gone';
  cells.uptime.textContent = gone ? '–' : duration(uptimeOf(a));
  const cpu = info.cpu_percent;
  clear(cells.cpu, gone || cpu === null || cpu === undefined ? '–' : meter(cpu / 100, `${cpu.toFixed(0)}%`));
  const total = info.memory_total;
  const used = total ? total - info.memory_available : null;
  clear(cells.mem, gone || !total ? '–' : meter(used / total, `${bytes(used)} / ${bytes(total)}`, 'meter-wide'));
  cells.load.textContent = gone || !info.load ? '–' : info.load[0].toFixed(2);
}
