// dxflow console: the router and the page frame. Views live in js/.
//   #/                               the fleet (master) or this node (agent)
//   #/node/JOB/NODE/TAB[?query]      one node: overview, files, logs, terminal, services

import { api, loadConfig, logout, nodeBase, session } from './js/api.js';
import { renderFleet, nodeHref, TABS } from './js/fleet.js';
import { jobHref, renderJob } from './js/jobtop.js';
import { badge, clear, every, h, icon } from './js/util.js';

import * as files from './js/files.js';
import * as logs from './js/logs.js';
import * as overview from './js/overview.js';
import * as services from './js/services.js';
import * as terminal from './js/terminal.js';

const VIEWS = { overview, files, logs, terminal, services };

const view = document.getElementById('view');
const crumbs = document.getElementById('crumbs');
const banner = document.getElementById('banner');
let current = null;  // AbortController of the view on screen

function parseRoute() {
  const raw = window.location.hash.replace(/^#/, '') || '/';
  const [path, query = ''] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, params: new URLSearchParams(query) };
}

export function navigate(hash, replace = false) {
  if (replace) window.history.replaceState(null, '', hash);
  else window.history.pushState(null, '', hash);
  route();
}

function setCrumbs(items) {
  clear(crumbs);
  items.forEach(([label, href], i) => {
    if (i) crumbs.append(h('span', { class: 'crumb-sep' }, '/'));
    crumbs.append(href ? h('a', { href }, label) : h('span', { class: href === '' ? 'crumb-plain' : 'crumb-current' }, label));
  });
}

export function showBanner(kind, text, detail = '') {
  if (!text) {
    banner.hidden = true;
    return;
  }
  banner.className = `banner banner-${kind}`;
  clear(banner, h('span', {}, text), detail ? h('span', { class: 'banner-detail' }, detail) : null);
  banner.hidden = false;
}

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const { signal } = current;
  showBanner('', '');
  const { parts, params } = parseRoute();
  if (parts[0] === 'node' && parts.length >= 3) {
    const [, job, node, tab = 'overview'] = parts;
    await renderNode(job, node, VIEWS[tab] ? tab : 'overview', params, signal);
    return;
  }
  if (parts[0] === 'job' && parts.length >= 2 && session.mode === 'fleet') {
    document.title = `Job ${parts[1]} · dxflow`;
    setCrumbs([['Fleet', '#/'], [`Job ${parts[1]}`, null]]);
    renderJob(view, parts[1], signal);
    return;
  }
  if (session.mode === 'node') {
    navigate(nodeHref(session.job, session.node), true);
    return;
  }
  document.title = 'Fleet · dxflow';
  setCrumbs([['Fleet', null]]);
  renderFleet(view, signal);
}

async function renderNode(job, node, tab, params, signal) {
  const label = TABS.find(([t]) => t === tab)[1];
  document.title = `${node} · ${label} · dxflow`;
  setCrumbs(session.mode === 'fleet'
    ? [['Fleet', '#/'], [`Job ${job}`, jobHref(job)], [node, nodeHref(job, node)], [label, null]]
    : [[`Job ${job}`, ''], [node, nodeHref(job, node)], [label, null]]);
  const stateBadge = h('span', { class: 'badge' }, '…');
  const host = h('span', { class: 'muted' });
  const body = h('div', { class: 'node-body' });
  clear(view, 
    h('div', { class: 'node-head' },
      h('div', { class: 'node-title' }, icon('server', 'icon-lg'),
        h('div', {}, h('h1', {}, node), h('div', { class: 'muted' }, `Job ${job} `, host)), stateBadge),
      h('nav', { class: 'tabs', 'aria-label': 'Node pages' }, TABS.map(([t, text, ic]) =>
        h('a', { href: nodeHref(job, node, t), class: t === tab ? 'tab tab-active' : 'tab',
          'aria-current': t === tab ? 'page' : null }, icon(ic), text)))),
    body);
  watchNode(job, node, stateBadge, signal);
  api(`${nodeBase(job, node)}/api/node`, { signal })
    .then((info) => { host.textContent = `\u00b7 host ${info.hostname} \u00b7 ${info.user}`; })
    .catch(() => {});
  try {
    await VIEWS[tab].render(body, { job, node, base: nodeBase(job, node), params, signal });
  } catch (e) {
    if (e.name !== 'AbortError') body.append(h('div', { class: 'alert alert-error' }, e.message));
  }
}

// Keeps the node's state badge current and says plainly when the node is lost or the job has ended.
function watchNode(job, node, stateBadge, signal) {
  const show = (state, text, detail) => {
    stateBadge.replaceWith(badge(state));
    stateBadge = document.querySelector('.node-title .badge');
    if (state === 'lost') showBanner('warning', `Node ${node} cannot be reached: its agent does not answer. Retrying\u2026`, detail);
    else if (state === 'gone') showBanner('error', text || `Job ${job} has ended: its agent on ${node} has stopped.`);
    else showBanner('', '');
    document.body.classList.toggle('node-gone', state === 'gone');
  };
  if (session.mode === 'fleet') {
    every(3000, async () => {
      let agents;
      try {
        agents = await api('/api/agents?all=1', { signal });
      } catch (e) {
        if (e.name !== 'AbortError') showBanner('error', `The master does not answer: ${e.message}`);
        return;
      }
      const a = agents.find((x) => x.job === job && x.node === node);
      if (!a || a.state === 'gone') {
        show('gone', `Job ${job} has ended: its agent on ${node} has stopped.`);
        return;
      }
      if (a.state === 'lost') {
        show('lost', '', a.detail);
        return;
      }
      try {  // the master checks each agent only now and then: ask this one now
        await api(`${nodeBase(job, node)}/api/health`, { signal });
        show(a.state);
      } catch (e) {
        if (e.name === 'AbortError') return;
        if (e.kind === 'lost') show('lost', '', e.message);
        else if (e.kind === 'gone') show('gone', `Job ${job} has ended: its agent on ${node} has stopped.`);
      }
    }, signal);
  } else {
    every(5000, async () => {
      try {
        await api('/api/health', { signal });
        show('ready');
      } catch (e) {
        if (e.name === 'AbortError') return;
        show('gone', e.status === 401 ? 'Your session has ended: open a new console link.'
          : 'The agent does not answer: the job has probably ended.');
      }
    }, signal);
  }
}

async function main() {
  try {
    await loadConfig();
  } catch (e) {
    clear(view, h('div', { class: 'alert alert-error' }, `The console cannot start: ${e.message}`));
    return;
  }
  document.getElementById('user').textContent = session.user;
  document.getElementById('mode').textContent = session.mode === 'fleet' ? 'login node' : `node ${session.node}`;
  const out = document.getElementById('logout');
  out.hidden = false;
  out.addEventListener('click', logout);
  window.addEventListener('hashchange', route);
  route();
}

main();
