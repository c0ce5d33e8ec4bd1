// A small live line chart in SVG: the last N samples of one or more series.

import { h } from './util.js';

const NS = 'http://www.w3.org/2000/svg';
const W = 600;
const H = 160;
const MIN_WINDOW = 15;  // samples

function svg(tag, attrs) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

export class LineChart {
  // series: [{label, color}]; max: number or () => number (null: from the data); format: value -> text
  constructor({ title, series, max = null, format = (v) => v.toFixed(1), capacity = 150, interval = 2, subtitle = '' }) {
    this.series = series;
    this.interval = interval;
    this.max = max;
    this.format = format;
    this.capacity = capacity;
    this.data = series.map(() => []);
    this.paths = [];
    this.areas = [];
    const plot = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', class: 'chart-svg' });
    for (let i = 1; i < 4; i += 1) {
      plot.append(svg('line', { x1: 0, x2: W, y1: (H * i) / 4, y2: (H * i) / 4, class: 'chart-grid',
        'vector-effect': 'non-scaling-stroke' }));
    }
    series.forEach((s) => {
      const area = svg('path', { fill: s.color, 'fill-opacity': series.length > 1 ? '0.06' : '0.12', stroke: 'none' });
      const path = svg('path', { fill: 'none', stroke: s.color, 'stroke-width': '2', 'vector-effect': 'non-scaling-stroke',
        'stroke-linejoin': 'round' });
      plot.append(area, path);
      this.areas.push(area);
      this.paths.push(path);
    });
    this.values = series.map((s) => h('span', { class: 'chart-value' }, '–'));
    this.axisTop = h('span', { class: 'chart-axis chart-axis-top' }, '');
    this.axisMid = h('span', { class: 'chart-axis chart-axis-mid' }, '');
    this.span = h('span', { class: 'chart-span' }, '');
    this.el = h('section', { class: 'card chart' },
      h('header', { class: 'chart-head' },
        h('div', {}, h('h3', {}, title), subtitle ? h('div', { class: 'chart-sub' }, subtitle) : null),
        h('div', { class: 'chart-legend' }, series.map((s, i) => h('span', { class: 'legend-item' },
          h('span', { class: 'legend-dot', style: `background:${s.color}` }),
          series.length > 1 ? h('span', { class: 'legend-label' }, s.label) : null, this.values[i])))),
      h('div', { class: 'chart-body' }, plot, this.axisTop, this.axisMid,
        h('span', { class: 'chart-axis chart-axis-bottom' }, '0'),
        this.span));
  }

  push(values) {
    values.forEach((v, i) => {
      const list = this.data[i];
      list.push(v === null || v === undefined || Number.isNaN(v) ? null : Number(v));
      if (list.length > this.capacity) list.shift();
    });
    this.render();
  }

  top() {
    const given = typeof this.max === 'function' ? this.max() : this.max;
    if (given) return given;
    let m = 0;
    for (const list of this.data) for (const v of list) if (v !== null && v > m) m = v;
    if (m <= 0) return 1;
    const mag = 10 ** Math.floor(Math.log10(m));
    return Math.ceil((m * 1.15) / mag) * mag;  // a round number above the data
  }

  render() {
    const top = this.top();
    // the window grows with the samples, from one minute up to the capacity
    const shown = Math.min(this.capacity, Math.max(MIN_WINDOW, ...this.data.map((l) => l.length)));
    const step = W / (shown - 1);
    this.span.textContent = `last ${Math.round((shown * this.interval) / 60)} min`;
    this.data.forEach((list, i) => {
      const offset = shown - list.length;
      let d = '';
      let first = null;
      let last = null;
      list.forEach((v, j) => {
        if (v === null) return;
        const x = (offset + j) * step;
        const y = H - Math.min(1, v / top) * (H - 2) - 1;
        d += `${d ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`;
        if (first === null) first = x;
        last = x;
      });
      this.paths[i].setAttribute('d', d);
      this.areas[i].setAttribute('d', d ? `${d}L${last.toFixed(1)},${H}L${first.toFixed(1)},${H}Z` : '');
      const current = [...list].reverse().find((v) => v !== null);
      this.values[i].textContent = current === undefined ? '–' : this.format(current);
    });
    this.axisTop.textContent = this.format(top);
    this.axisMid.textContent = this.format(top / 2);
  }
}
