// Files on the node, inside its allowed roots: browse, download, upload (button or drag and drop, with
// progress), new folder, rename, delete.

import { api, errorOf, unsafeHeaders, withQuery } from './api.js';
import { bytes, clear, dialog, h, icon, joinPath, parentPath, toast, when } from './util.js';

export async function render(body, { job, node, base, params, signal }) {
  const rootsBar = h('div', { class: 'segmented', role: 'group', 'aria-label': 'Roots' });
  const crumbs = h('nav', { class: 'path', 'aria-label': 'Folder' });
  const fileInput = h('input', { type: 'file', multiple: true, hidden: true, 'data-testid': 'upload-input' });
  const uploads = h('div', { class: 'uploads' });
  const tbody = h('tbody');
  const status = h('div', { class: 'files-status muted' });
  const error = h('div', { class: 'alert alert-error', hidden: true });
  const dropHint = h('div', { class: 'drop-hint' }, icon('upload', 'icon-lg'), h('span', {}, 'Drop files to upload'));
  const card = h('section', { class: 'card files-card' },
    h('div', { class: 'table-wrap' }, h('table', { class: 'table files' },
      h('thead', {}, h('tr', {}, h('th', { class: 'col-name' }, 'Name'), h('th', { class: 'num' }, 'Size'),
        h('th', {}, 'Modified'), h('th', {}, 'Mode'), h('th', {}, ''))),
      tbody)),
    status, dropHint);
  clear(body, 
    h('div', { class: 'toolbar' }, rootsBar,
      h('div', { class: 'toolbar-right' },
        h('button', { class: 'btn', type: 'button', onclick: () => refresh() }, icon('refresh'), 'Refresh'),
        h('button', { class: 'btn', type: 'button', onclick: () => mkdir() }, icon('plus'), 'New folder'),
        h('button', { class: 'btn btn-primary', type: 'button', onclick: () => fileInput.click() }, icon('upload'), 'Upload'),
        fileInput)),
    crumbs, error, uploads, card);

  let roots = [];
  let dir = params.get('path') || '';
  let entries = [];

  try {
    roots = await api(`${base}/api/files/roots`, { signal });
  } catch (e) {
    if (e.name === 'AbortError') return;
    error.textContent = `Cannot read the node's file roots: ${e.message}`;
    error.hidden = false;
    return;
  }
  if (!dir) dir = roots.length ? roots[0].path : '/';

  const hrefFor = (path) => `#/node/${encodeURIComponent(job)}/${encodeURIComponent(node)}/files?path=${encodeURIComponent(path)}`;
  let picked = null;  // the root last chosen: workdir and home are often the same folder
  const rootOf = (path) => {
    const inside = roots.filter((r) => path === r.path || path.startsWith(r.path.replace(/\/?$/, '/')))
      .sort((a, b) => b.path.length - a.path.length);
    return inside.find((r) => r === picked && r.path.length === inside[0].path.length) || inside[0];
  };

  function go(path) {
    dir = path;
    window.history.replaceState(null, '', hrefFor(path));
    refresh();
  }

  function drawPath() {
    const root = rootOf(dir);
    clear(rootsBar, roots.map((r) => h('button', { type: 'button', title: r.path,
      class: r === root ? 'seg seg-active' : 'seg', onclick: () => { picked = r; go(r.path); } }, icon(r.name === 'home' ? 'home' : 'folder'), r.name)));
    clear(crumbs);
    const start = root ? root.path : '/';
    crumbs.append(h('a', { href: hrefFor(start), onclick: (e) => { e.preventDefault(); go(start); }, title: start },
      root ? root.name : '/'));
    const rest = dir.slice(start.length).split('/').filter(Boolean);
    let acc = start;
    for (const part of rest) {
      acc = joinPath(acc, part);
      const target = acc;
      crumbs.append(h('span', { class: 'crumb-sep' }, '/'),
        h('a', { href: hrefFor(target), onclick: (e) => { e.preventDefault(); go(target); } }, part));
    }
    crumbs.append(h('span', { class: 'path-full muted' }, dir));
  }

  async function refresh() {
    drawPath();
    let listing;
    try {
      listing = await api(withQuery(`${base}/api/files`, { path: dir }), { signal });
      error.hidden = true;
    } catch (e) {
      if (e.name === 'AbortError') return;
      error.textContent = e.message;
      error.hidden = false;
      clear(tbody);
      status.textContent = '';
      return;
    }
    dir = listing.path || dir;
    drawPath();
    entries = (listing.entries || []).slice().sort((a, b) => (a.type === 'dir') === (b.type === 'dir')
      ? a.name.localeCompare(b.name, undefined, { numeric: true }) : a.type === 'dir' ? -1 : 1);
    clear(tbody);
    const root = rootOf(dir);
    if (!root || root.path !== dir) {
      const up = parentPath(dir);
      tbody.append(h('tr', { class: 'row-up' }, h('td', { colspan: 5 },
        h('a', { href: hrefFor(up), class: 'entry', onclick: (e) => { e.preventDefault(); go(up); } }, icon('up'), '..'))));
    }
    for (const entry of entries) tbody.append(row(entry));
    const nfiles = entries.filter((e) => e.type !== 'dir').length;
    const count = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
    status.textContent = entries.length
      ? `${count(entries.length - nfiles, 'folder')}, ${count(nfiles, 'file')} \u00b7 drop files here to upload them to ${dir}`
      : `Empty folder \u00b7 drop files here to upload them to ${dir}`;
  }

  function row(entry) {
    const path = joinPath(dir, entry.name);
    const isDir = entry.type === 'dir';
    const name = isDir
      ? h('a', { href: hrefFor(path), class: 'entry', onclick: (e) => { e.preventDefault(); go(path); } }, icon('folder', 'icon-dir'), entry.name)
      : h('a', { href: withQuery(`${base}/api/files/content`, { path }), class: 'entry', download: entry.name },
        icon(entry.type === 'link' ? 'link' : 'file'), entry.name);
    return h('tr', { dataset: { name: entry.name } },
      h('td', { class: 'col-name' }, name),
      h('td', { class: 'num' }, isDir ? '' : bytes(entry.size)),
      h('td', { class: 'muted' }, when(entry.mtime)),
      h('td', { class: 'mono muted' }, modeText(entry)),
      h('td', { class: 'cell-actions' },
        isDir ? null : h('a', { class: 'icon-btn', href: withQuery(`${base}/api/files/content`, { path }), download: entry.name,
          title: 'Download', 'aria-label': `Download ${entry.name}` }, icon('download')),
        h('button', { class: 'icon-btn', type: 'button', title: 'Rename', 'aria-label': `Rename ${entry.name}`,
          onclick: () => rename(entry) }, icon('edit')),
        h('button', { class: 'icon-btn icon-btn-danger', type: 'button', title: 'Delete', 'aria-label': `Delete ${entry.name}`,
          onclick: () => remove(entry) }, icon('trash'))));
  }

  async function mkdir() {
    const name = await dialog({ title: 'New folder', message: `In ${dir}`, input: '', confirm: 'Create' });
    if (!name) return;
    try {
      await api(`${base}/api/files/mkdir`, { method: 'POST', json: { path: joinPath(dir, name), parents: false }, signal });
      toast(`Folder ${name} created`, 'success');
    } catch (e) {
      toast(`Cannot create ${name}: ${e.message}`, 'error', 7000);
    }
    refresh();
  }

  async function rename(entry) {
    const name = await dialog({ title: `Rename ${entry.name}`, input: entry.name, confirm: 'Rename' });
    if (!name || name === entry.name) return;
    try {
      await api(`${base}/api/files/move`, { method: 'POST', signal,
        json: { src: joinPath(dir, entry.name), dst: joinPath(dir, name), overwrite: false } });
      toast(`Renamed to ${name}`, 'success');
    } catch (e) {
      toast(`Cannot rename ${entry.name}: ${e.message}`, 'error', 7000);
    }
    refresh();
  }

  async function remove(entry) {
    const isDir = entry.type === 'dir';
    const ok = await dialog({ title: `Delete ${entry.name}?`, danger: true, confirm: 'Delete',
      message: isDir ? `The folder ${joinPath(dir, entry.name)} and everything in it will be deleted.`
        : `${joinPath(dir, entry.name)} will be deleted.` });
    if (!ok) return;
    try {
      await api(withQuery(`${base}/api/files`, { path: joinPath(dir, entry.name), recursive: isDir ? 1 : undefined }),
        { method: 'DELETE', signal });
      toast(`${entry.name} deleted`, 'success');
    } catch (e) {
      toast(`Cannot delete ${entry.name}: ${e.message}`, 'error', 7000);
    }
    refresh();
  }

  async function uploadAll(files) {
    const target = dir;
    const existing = new Set(entries.map((e) => e.name));
    for (const file of files) {
      let overwrite = false;
      if (existing.has(file.name)) {
        overwrite = await dialog({ title: `Replace ${file.name}?`, message: `${joinPath(target, file.name)} exists already.`,
          confirm: 'Replace', danger: true });
        if (!overwrite) continue;
      }
      await upload(file, joinPath(target, file.name), overwrite);
    }
    if (dir === target) refresh();
  }

  function upload(file, path, overwrite) {
    const bar = h('div', { class: 'progress-fill' });
    const pct = h('span', { class: 'upload-pct' }, '0%');
    const note = h('span', { class: 'upload-note muted' }, bytes(file.size));
    const item = h('div', { class: 'upload', dataset: { name: file.name } },
      icon('upload'), h('span', { class: 'upload-name' }, file.name),
      h('div', { class: 'progress', role: 'progressbar', 'aria-label': `Uploading ${file.name}` }, bar), pct, note);
    uploads.append(item);
    const started = performance.now();
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open('PUT', withQuery(`${base}/api/files/content`, { path, overwrite: overwrite ? 1 : undefined }));
      for (const [k, v] of Object.entries(unsafeHeaders({ 'Content-Type': 'application/octet-stream' }))) xhr.setRequestHeader(k, v);
      xhr.upload.onprogress = (e) => {
        if (!e.lengthComputable) return;
        const f = e.loaded / e.total;
        bar.style.width = `${(f * 100).toFixed(1)}%`;
        pct.textContent = `${Math.floor(f * 100)}%`;
        const secs = (performance.now() - started) / 1000;
        note.textContent = `${bytes(e.loaded)} of ${bytes(e.total)} \u00b7 ${bytes(e.loaded / Math.max(secs, 0.001))}/s`;
      };
      xhr.onload = async () => {
        if (xhr.status >= 200 && xhr.status < 300) {
          let answer = {};
          try { answer = JSON.parse(xhr.responseText); } catch (_) { /* keep {} */ }
          bar.style.width = '100%';
          pct.textContent = '100%';
          item.classList.add('upload-done');
          note.textContent = `${bytes(answer.size ?? file.size)} \u00b7 sha256 ${(answer.sha256 || '').slice(0, 12)}\u2026`;
          note.title = answer.sha256 || '';
          item.dataset.sha256 = answer.sha256 || '';
          setTimeout(() => item.remove(), 8000);
        } else {
          const err = await errorOf(new Response(xhr.responseText, { status: xhr.status,
            headers: { 'Content-Type': xhr.getResponseHeader('Content-Type') || 'text/plain' } }));
          failed(err.message);
        }
        resolve();
      };
      const failed = (message) => {
        item.classList.add('upload-failed');
        pct.textContent = 'failed';
        note.textContent = message;
        toast(`Upload of ${file.name} failed: ${message}`, 'error', 8000);
      };
      xhr.onerror = () => { failed('the connection broke'); resolve(); };
      signal.addEventListener('abort', () => xhr.abort());
      xhr.send(file);
    });
  }

  fileInput.addEventListener('change', () => {
    const files = [...fileInput.files];
    fileInput.value = '';
    uploadAll(files);
  });
  let depth = 0;
  card.addEventListener('dragenter', (e) => { if (hasFiles(e)) { e.preventDefault(); depth += 1; card.classList.add('dropping'); } });
  card.addEventListener('dragover', (e) => { if (hasFiles(e)) { e.preventDefault(); e.dataTransfer.dropEffect = 'copy'; } });
  card.addEventListener('dragleave', () => { depth = Math.max(0, depth - 1); if (!depth) card.classList.remove('dropping'); });
  card.addEventListener('drop', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    card.classList.remove('dropping');
    const items = [...(e.dataTransfer.items || [])];
    const folders = items.filter((it) => it.webkitGetAsEntry && it.webkitGetAsEntry()?.isDirectory).length;
    if (folders) toast('Folders are not uploaded: drop files, or use `dxflow cp -r`', 'info', 6000);
    const files = [...e.dataTransfer.files].filter((f, i) => !(items[i]?.webkitGetAsEntry?.()?.isDirectory));
    uploadAll(files);
  });
  refresh();
}

function hasFiles(e) {
  return [...(e.dataTransfer?.types || [])].includes('Files');
}

function modeText(entry) {
  const mode = entry.mode;
  if (typeof mode === 'string') return mode;
  if (typeof mode !== 'number') return '';
  const kind = entry.type === 'dir' ? 'd' : entry.type === 'link' ? 'l' : '-';
  let out = kind;
  for (let shift = 6; shift >= 0; shift -= 3) {
    const bits = (mode >> shift) & 7;
    out += (bits & 4 ? 'r' : '-') + (bits & 2 ? 'w' : '-') + (bits & 1 ? 'x' : '-');
  }
  return out;
}
