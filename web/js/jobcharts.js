// The job's own usage over its whole life (docs/metrics.md): charts of what the agent sampled since the job
// started on this node (/api/metrics), and, on the master's console, of the whole job (/api/metrics/JOB).

import { api, session, withQuery } from './api.js';
import { bytes, clear, every, h } from './util.js';

const NS = 'http://www.w3.org/2000/svg';
const W = 600;
const H = 160;
const POLL_MS = 2000;
const JOB_POLL_MS = 10000;
const COLORS = ['#2563eb', '#16a34a', '#d97706', '#9333ea', '#dc2626', '#0891b2', '#db2777', '#4d7c0f'];

function svg(tag, attrs) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function span(seconds) {
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// A line chart over time: x from the first sample to the last (the job's whole life), any spacing.
export class TimeChart {
  constructor({ title, subtitle = '', series, max = null, format = (v) => v.toFixed(1) }) {
    this.series = series;
    this.max = max;
    this.format = format;
    this.t = [];
    this.data = series.map(() => []);
    this.paths = [];
    const plot = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', class: 'chart-svg' });
    for (let i = 1; i < 4; i += 1) {
      plot.append(svg('line', { x1: 0, x2: W, y1: (H * i) / 4, y2: (H * i) / 4, class: 'chart-grid',
        'vector-effect': 'non-scaling-stroke' }));
    }
    series.forEach((s) => {
      const path = svg('path', { fill: 'none', stroke: s.color, 'stroke-width': '2', 'vector-effect': 'non-scaling-stroke',
        'stroke-linejoin': 'round', 'stroke-dasharray': s.dashed ? '6 4' : 'none' });
      plot.append(path);
      this.paths.push(path);
    });
    this.values = series.map(() => h('span', { class: 'chart-value' }, '–'));
    this.axisTop = h('span', { class: 'chart-axis chart-axis-top' }, '');
    this.axisMid = h('span', { class: 'chart-axis chart-axis-mid' }, '');
    this.spanEl = h('span', { class: 'chart-span' }, '');
    this.el = h('section', { class: 'card chart', 'data-chart': title },
      // the legend wraps under the title when the card is narrow (three series with their values)
      h('header', { class: 'chart-head', style: 'flex-wrap:wrap' },
        h('div', {}, h('h3', {}, title), subtitle ? h('div', { class: 'chart-sub' }, subtitle) : null),
        h('div', { class: 'chart-legend' }, series.map((s, i) => h('span', { class: 'legend-item' },
          h('span', { class: 'legend-dot', style: `background:${s.color}` }),
          series.length > 1 ? h('span', { class: 'legend-label' }, s.label) : null, this.values[i])))),
      h('div', { class: 'chart-body' }, plot, this.axisTop, this.axisMid,
        h('span', { class: 'chart-axis chart-axis-bottom' }, '0'), this.spanEl));
  }

  // times: epoch seconds; rows: one value (or null) per series, per time
  add(times, rows) {
    times.forEach((t, j) => {
      this.t.push(t);
      rows[j].forEach((v, i) => this.data[i].push(v === null || v === undefined ? null : Number(v)));
    });
    this.render();
  }

  top() {
    const given = typeof this.max === 'function' ? this.max() : this.max;
    let m = given || 0;
    for (const list of this.data) for (const v of list) if (v !== null && v > m) m = v;
    if (m <= 0) return 1;
    if (given && m <= given) return given;
    const mag = 10 ** Math.floor(Math.log10(m));
    return Math.ceil((m * 1.15) / mag) * mag;
  }

  render() {
    if (!this.t.length) return;
    const top = this.top();
    const t0 = this.t[0];
    const width = Math.max(1, this.t[this.t.length - 1] - t0);
    this.spanEl.textContent = `since the job started \u00b7 ${span(width)}`;
    this.data.forEach((list, i) => {
      let d = '';
      let pen = false;
      list.forEach((v, j) => {
        if (v === null) { pen = false; return; }
        const x = ((this.t[j] - t0) / width) * W;
        const y = H - Math.min(1, v / top) * (H - 2) - 1;
        d += `${pen ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`;
        pen = true;
      });
      this.paths[i].setAttribute('d', d);
      const current = [...list].reverse().find((v) => v !== null);
      this.values[i].textContent = current === undefined ? '–' : this.format(current);
    });
    this.axisTop.textContent = this.format(top);
    this.axisMid.textContent = this.format(top / 2);
  }
}

const cores = (v) => v.toFixed(2);
const rate = (v) => `${bytes(v)}/s`;

// Rows of one node's /api/metrics answer as {column: [values]} (times under "t").
function columns(answer) {
  const out = {};
  answer.columns.forEach((c, i) => { out[c] = answer.rows.map((r) => r[i]); });
  return out;
}

// Per-second rates of a counter column (null where the step back is unknown).
function rates(times, counter, last) {
  return times.map((t, j) => {
    const [pt, pv] = j ? [times[j - 1], counter[j - 1]] : last;
    if (pt === null || pv === null || counter[j] === null || t <= pt) return null;
    return Math.max(0, (counter[j] - pv) / (t - pt));
  });
}

// The node's charts: the job's CPU against its cores, memory against its limit, disk I/O, its GPUs.
export function renderNodeJob(body, { base, signal }) {
  const note = h('div', { class: 'muted' }, 'This job on this node, since it started (sampled by the agent every 2 s).');
  const error = h('div', { class: 'alert alert-error', hidden: true });
  const charts = h('div', { class: 'charts' });
  const gpuCharts = h('div', { class: 'charts' });
  clear(body, h('h2', {}, 'Job usage'), note, error, charts, gpuCharts);
  let summary = {};
  const cpu = new TimeChart({ title: 'Job CPU', subtitle: 'cores busy, against cores allocated',
    series: [{ label: 'used', color: COLORS[0] }, { label: 'allocated', color: COLORS[4], dashed: true }], format: cores });
  const mem = new TimeChart({ title: 'Job memory', subtitle: 'processes (RSS), cgroup, limit',
    series: [{ label: 'RSS', color: COLORS[1] }, { label: 'cgroup', color: COLORS[5] },
      { label: 'limit', color: COLORS[4], dashed: true }], format: bytes });
  const io = new TimeChart({ title: 'Job disk I/O', subtitle: 'bytes per second',
    series: [{ label: 'read', color: COLORS[2] }, { label: 'write', color: COLORS[3] }], format: rate, max: 1024 });
  charts.append(cpu.el, mem.el, io.el);
  let gpuUtil = null;
  let gpuMem = null;
  let since = null;
  let last = [null, null, null];  // time, read, write of the newest row already drawn

  const poll = async () => {
    let answer;
    try {
      answer = await api(withQuery(`${base}/api/metrics`, { since: since === null ? null : since + 0.001 }), { signal });
      error.hidden = true;
    } catch (e) {
      if (e.name === 'AbortError' || e.kind === 'gone' || e.kind === 'lost') return;
      error.textContent = `No job metrics from the node: ${e.message}`;
      error.hidden = false;
      return;
    }
    summary = answer.summary || {};
    const c = columns(answer);
    const times = c.t;
    if (!times.length) return;
    const gpus = answer.gpus || [];
    if (gpus.length && !gpuUtil) {
      const series = gpus.map((g, i) => ({ label: `GPU ${g.index ?? g.uuid}`, color: COLORS[i % COLORS.length] }));
      gpuUtil = new TimeChart({ title: 'Job GPU utilization', subtitle: gpus[0].name || 'the job\u2019s GPUs', series,
        max: 100, format: (v) => `${v.toFixed(0)}%` });
      gpuMem = new TimeChart({ title: 'Job GPU memory', subtitle: 'used', series, format: bytes });
      gpuCharts.append(gpuUtil.el, gpuMem.el);
    }
    const reads = rates(times, c.read_bytes, [last[0], last[1]]);
    const writes = rates(times, c.write_bytes, [last[0], last[2]]);
    cpu.add(times, times.map((_, j) => [c.cpu_cores[j], summary.cores ?? null]));
    mem.add(times, times.map((_, j) => [c.rss_bytes[j], c.memory_bytes[j], summary.memory_limit_bytes ?? null]));
    io.add(times, times.map((_, j) => [reads[j], writes[j]]));
    if (gpuUtil) {
      gpuUtil.add(times, times.map((_, j) => gpus.map((g, i) => c[`gpu${i}_utilization_percent`][j])));
      gpuMem.add(times, times.map((_, j) => gpus.map((g, i) => c[`gpu${i}_memory_bytes`][j])));
    }
    const n = times.length - 1;
    last = [times[n], c.read_bytes[n], c.write_bytes[n]];
    since = times[n];
  };
  every(POLL_MS, poll, signal);
}

// The whole job (master's console only): every node's CPU and memory, summed per 2-s step.
export function renderWholeJob(body, { job, signal }) {
  if (session.mode !== 'fleet') return;
  const cpu = new TimeChart({ title: 'Whole job CPU', subtitle: 'cores busy on all nodes, against cores allocated',
    series: [{ label: 'used', color: COLORS[0] }, { label: 'allocated', color: COLORS[4], dashed: true }], format: cores });
  const mem = new TimeChart({ title: 'Whole job memory', subtitle: 'RSS of the job\u2019s processes on all nodes',
    series: [{ label: 'RSS', color: COLORS[1] }], format: bytes });
  const error = h('div', { class: 'alert alert-error', hidden: true });
  clear(body, h('h2', {}, 'Whole job'), error, h('div', { class: 'charts' }, cpu.el, mem.el));
  const poll = async () => {
    let answer;
    try {
      answer = await api(`/api/metrics/${encodeURIComponent(job)}`, { signal });
      error.hidden = true;
    } catch (e) {
      if (e.name === 'AbortError' || e.kind === 'gone' || e.kind === 'lost') return;
      error.textContent = `No metrics of the job: ${e.message}`;
      error.hidden = false;
      return;
    }
    // each node's figure at a time is its newest sample up to then (nodes sample at their own moments,
    // and downsample their past on their own): summed at every time any node sampled
    let allocated = 0;
    const nodes = answer.nodes.map((node) => {
      allocated += (node.summary && node.summary.cores) || 0;
      return columns(node);
    });
    const times = [...new Set(nodes.flatMap((c) => c.t))].sort((a, b) => a - b);
    const at = nodes.map(() => -1);
    const rows = times.map((t) => {
      let used = 0;
      let rss = 0;
      nodes.forEach((c, k) => {
        while (at[k] + 1 < c.t.length && c.t[at[k] + 1] <= t) at[k] += 1;
        if (at[k] >= 0) {
          used += c.cpu_cores[at[k]] || 0;
          rss += c.rss_bytes[at[k]] || 0;
        }
      });
      return [used, rss];
    });
    cpu.t = []; cpu.data = [[], []];
    mem.t = []; mem.data = [[]];
    cpu.add(times, rows.map(([used]) => [used, allocated || null]));
    mem.add(times, rows.map(([, rss]) => [rss]));
  };
  every(JOB_POLL_MS, poll, signal);
}
