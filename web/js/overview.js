// One node's live metrics: CPU, memory, load and (when there are GPUs) GPU charts; below them, the job's own
// usage on this node since it started, and (on the master's console) the whole job's (jobcharts.js).

import { api } from './api.js';
import { LineChart } from './chart.js';
import { renderNodeJob, renderWholeJob } from './jobcharts.js';
import { bytes, clear, duration, every, h } from './util.js';

const POLL_MS = 2000;
const COLORS = ['#2563eb', '#16a34a', '#d97706', '#9333ea', '#dc2626', '#0891b2', '#db2777', '#4d7c0f'];

export async function render(body, { job, base, signal }) {
  const facts = h('div', { class: 'facts' });
  const charts = h('div', { class: 'charts' });
  const gpuCharts = h('div', { class: 'charts' });
  const error = h('div', { class: 'alert alert-error', hidden: true });
  const jobSection = h('div', { class: 'job-usage' });
  const wholeJob = h('div', { class: 'job-usage' });
  clear(body, error, facts, charts, gpuCharts, jobSection, wholeJob);
  renderNodeJob(jobSection, { base, signal });
  renderWholeJob(wholeJob, { job, signal });

  let info = null;
  const cpu = new LineChart({ title: 'Node CPU', subtitle: 'all cores, every user\u2019s work, % busy', series: [{ label: 'CPU', color: COLORS[0] }],
    max: 100, format: (v) => `${v.toFixed(0)}%` });
  const mem = new LineChart({ title: 'Node memory', subtitle: 'used, every user\u2019s', series: [{ label: 'used', color: COLORS[1] }],
    max: () => info && info.memory_total, format: bytes });
  const load = new LineChart({ title: 'Node load', subtitle: 'averages over 1, 5, 15 min',
    series: [{ label: '1m', color: COLORS[2] }, { label: '5m', color: COLORS[3] }, { label: '15m', color: COLORS[5] }],
    format: (v) => v.toFixed(2) });
  charts.append(cpu.el, mem.el, load.el);
  let gpuUtil = null;
  let gpuMem = null;

  const poll = async () => {
    try {
      info = await api(`${base}/api/node`, { signal });
      error.hidden = true;
    } catch (e) {
      if (e.name === 'AbortError') return;
      if (e.kind === 'gone' || e.kind === 'lost') {  // the page's banner says so
        error.hidden = true;
        return;
      }
      error.textContent = `No metrics from the node: ${e.message}`;
      error.hidden = false;
      cpu.push([null]);
      mem.push([null]);
      load.push([null, null, null]);
      return;
    }
    cpu.push([info.cpu_percent]);
    mem.push([info.memory_total - info.memory_available]);
    load.push(info.load);
    const gpus = info.gpus || [];
    if (gpus.length && !gpuUtil) {
      const series = gpus.map((g, i) => ({ label: `GPU ${g.index ?? g.uuid}`, color: COLORS[i % COLORS.length] }));
      gpuUtil = new LineChart({ title: 'GPU utilization', subtitle: gpus[0].name, series, max: 100,
        format: (v) => `${v.toFixed(0)}%` });
      gpuMem = new LineChart({ title: 'GPU memory', subtitle: 'used', series,
        max: () => Math.max(...(info.gpus || []).map((g) => g.memory_total)), format: bytes });
      gpuCharts.append(gpuUtil.el, gpuMem.el);
    }
    if (gpuUtil) {
      gpuUtil.push(gpus.map((g) => g.utilization));
      gpuMem.push(gpus.map((g) => g.memory_used));
    }
    drawFacts(facts, info);
  };
  every(POLL_MS, poll, signal);
}

function drawFacts(el, info) {
  const used = info.memory_total - info.memory_available;
  const gpus = info.gpus || [];
  const items = [
    ['Hostname', info.hostname, `${info.scheduler} job ${info.job}, cluster ${info.cluster}`],
    ['CPUs', `${info.cpus}`, `${info.cpu_percent.toFixed(0)}% busy \u00b7 ${info.cpus_allowed} usable`],
    ['Memory', `${bytes(used)}`, `used of ${bytes(info.memory_total)}`],
    ['Load', info.load.map((x) => x.toFixed(2)).join('  '), '1, 5 and 15 min'],
    ['Uptime', duration(info.agent_uptime), `agent \u00b7 node up ${duration(info.uptime)}`],
    ['GPUs', gpus.length ? `${gpus.length}` : 'none', gpus.length ? gpus[0].name : 'none allocated to the job'],
  ];
  clear(el, items.map(([label, value, sub]) => h('div', { class: 'card fact' },
    h('div', { class: 'fact-label' }, label), h('div', { class: 'fact-value' }, value), h('div', { class: 'fact-sub' }, sub))));
}
