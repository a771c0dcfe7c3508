// Fleet updates: the signed release bundles (admins upload one, the server checks its signature and every file
// before keeping it) and their rollouts to chosen machines or a percentage of the fleet, each machine's step, and
// pause, resume and stop. Viewers see everything and change nothing; the server checks the admin role every time.
import { t, addStrings, api, h, clear, table, act, heading, when, ago, can, state, toast, css, refusalText } from '../lib.js';
import { refresh } from '../app.js';

addStrings({
  zh: {
    'rel.title': '软件升级', 'rel.releases': '发布版本', 'rel.rollouts': '推送批次', 'rel.upload': '上传升级包',
    'rel.uploading': '正在上传 {name}：{pct}%', 'rel.checking': '已上传，正在校验签名和文件…', 'rel.uploaded': '版本 {version} 已上传并通过校验',
    'rel.version': '版本', 'rel.uploaded_at': '上传时间', 'rel.size': '大小', 'rel.files': '文件数', 'rel.min': '可从此版本升级',
    'rel.key': '签名密钥', 'rel.notes': '说明', 'rel.state': '状态', 'rel.active': '可用', 'rel.withdrawn': '已撤回',
    'rel.withdraw': '撤回', 'rel.withdraw_text': '撤回后不再向任何设备推送或提供版本 {version}，进行中的推送批次将停止。',
    'rel.withdrawn_done': '版本 {version} 已撤回', 'rel.rollout': '推送', 'rel.actions': '操作', 'rel.none': '还没有上传任何版本',
    'ro.id': '批次', 'ro.targets': '范围', 'ro.machines_n': '{n} 台设备', 'ro.percent_n': '{p}% 的设备（{n} 台）',
    'ro.progress': '进度', 'ro.steps': '各步骤设备数', 'ro.created': '创建时间', 'ro.max_rb': '回滚上限', 'ro.stop_reason': '停止原因',
    'ro.pause': '暂停', 'ro.resume': '继续', 'ro.stop': '停止', 'ro.view': '查看', 'ro.none': '还没有推送批次',
    'ro.stop_text': '停止后不再向此批次的设备推送，且不能继续。', 'ro.paused': '已暂停', 'ro.resumed': '已继续', 'ro.stopped_done': '已停止',
    'ro.state.active': '进行中', 'ro.state.paused': '已暂停', 'ro.state.stopped': '已停止', 'ro.state.done': '已完成',
    'ro.new': '新建推送', 'ro.choose': '推送给', 'ro.by_machines': '选定的设备', 'ro.by_percent': '按比例',
    'ro.percent': '设备比例（1–100%）', 'ro.max_rb_label': '回滚上限（%）：超过即自动停止', 'ro.create': '开始推送',
    'ro.created_done': '推送批次 {id} 已开始：{n} 台设备', 'ro.tick': '请至少勾选一台设备', 'ro.detail': '推送批次 {id}：版本 {version}',
    'ro.machine': '设备', 'ro.step': '当前步骤', 'ro.reason': '原因', 'ro.running': '运行版本', 'ro.updated': '更新时间',
    'ro.back': '返回软件升级', 'ro.location': '位置', 'ro.healthy_of': '{done}/{n} 台已升级',
    'step.pending': '等待', 'step.downloading': '下载中', 'step.downloaded': '已下载', 'step.verified': '已校验',
    'step.installed': '已安装', 'step.deferred': '等待空闲', 'step.switched': '已切换', 'step.healthy': '已升级',
    'step.rolled_back': '已回滚', 'step.refused': '已拒绝', 'step.failed': '失败',
    'refusal.unknown_key': '签名密钥不受信任：此升级包不是用云端信任的发布密钥签名的',
    'refusal.bad_signature': '签名不匹配：升级包在签名后被改动过',
    'refusal.tampered': '文件被篡改：升级包中的文件与签名时不一致',
    'refusal.malformed': '不是有效的升级包',
    'refusal.unsupported_format': '升级包格式过新，此云端无法读取',
    'refusal.version_exists': '此版本号已上传过，内容不同：请为新包使用新的版本号',
    'refusal.bundle_too_large': '升级包太大',
    'refusal.empty': '文件是空的',
    'refusal.machine_in_rollout': '有设备已在另一个未结束的推送批次中',
    'refusal.no_machines': '按此比例没有选中任何设备',
    'reason.heartbeat': '心跳显示已运行新版本', 'reason.too_old': '设备版本太旧，不能直接升级到此版本',
    'reason.downgrade': '不高于设备装过的最高版本（防回退）', 'reason.wrong_device_type': '升级包不适用于此设备类型',
    'reason.busy': '设备忙（正在出水或维护中）',
    'hist.open': '步骤记录', 'hist.title': '设备 {machine} 的升级步骤（批次 {id}）', 'hist.now': '当前步骤',
    'hist.source.machine': '设备上报', 'hist.source.heartbeat': '心跳', 'hist.source.cloud': '云端',
    'hist.repeats': '共 {n} 次，最后一次 {at}', 'hist.late': '晚到：未改变当前步骤', 'hist.other_version': '版本 {version}',
    'hist.running': '运行 {version}', 'hist.kept': '按收到的先后排列；每台设备最多保留最近 {n} 条', 'hist.close': '关闭',
  },
  en: {
    'rel.title': 'Software updates', 'rel.releases': 'Releases', 'rel.rollouts': 'Rollouts', 'rel.upload': 'Upload a bundle',
    'rel.uploading': 'Uploading {name}: {pct}%', 'rel.checking': 'Uploaded; checking the signature and every file…', 'rel.uploaded': 'Release {version} uploaded and checked',
    'rel.version': 'Version', 'rel.uploaded_at': 'Uploaded', 'rel.size': 'Size', 'rel.files': 'Files', 'rel.min': 'Upgrades from',
    'rel.key': 'Signing key', 'rel.notes': 'Notes', 'rel.state': 'State', 'rel.active': 'Available', 'rel.withdrawn': 'Withdrawn',
    'rel.withdraw': 'Withdraw', 'rel.withdraw_text': 'Release {version} is no longer offered or served to any machine; its rollouts stop.',
    'rel.withdrawn_done': 'Release {version} withdrawn', 'rel.rollout': 'Roll out', 'rel.actions': 'Actions', 'rel.none': 'No release uploaded yet',
    'ro.id': 'Rollout', 'ro.targets': 'Machines', 'ro.machines_n': '{n} machines', 'ro.percent_n': '{p}% of the fleet ({n})',
    'ro.progress': 'Progress', 'ro.steps': 'Machines per step', 'ro.created': 'Created', 'ro.max_rb': 'Rollback limit', 'ro.stop_reason': 'Stopped because',
    'ro.pause': 'Pause', 'ro.resume': 'Resume', 'ro.stop': 'Stop', 'ro.view': 'Open', 'ro.none': 'No rollout yet',
    'ro.stop_text': 'Its machines are offered nothing more, and it cannot be resumed.', 'ro.paused': 'Paused', 'ro.resumed': 'Resumed', 'ro.stopped_done': 'Stopped',
    'ro.state.active': 'Active', 'ro.state.paused': 'Paused', 'ro.state.stopped': 'Stopped', 'ro.state.done': 'Done',
    'ro.new': 'New rollout', 'ro.choose': 'Roll out to', 'ro.by_machines': 'Chosen machines', 'ro.by_percent': 'A percentage',
    'ro.percent': 'Share of machines (1–100 %)', 'ro.max_rb_label': 'Rollback limit (%): stops by itself above it', 'ro.create': 'Start the rollout',
    'ro.created_done': 'Rollout {id} started: {n} machines', 'ro.tick': 'Tick at least one machine', 'ro.detail': 'Rollout {id}: release {version}',
    'ro.machine': 'Machine', 'ro.step': 'Step', 'ro.reason': 'Reason', 'ro.running': 'Running', 'ro.updated': 'Updated',
    'ro.back': 'Back to software updates', 'ro.location': 'Location', 'ro.healthy_of': '{done}/{n} updated',
    'step.pending': 'Waiting', 'step.downloading': 'Downloading', 'step.downloaded': 'Downloaded', 'step.verified': 'Verified',
    'step.installed': 'Installed', 'step.deferred': 'Waiting until idle', 'step.switched': 'Switched', 'step.healthy': 'Updated',
    'step.rolled_back': 'Rolled back', 'step.refused': 'Refused', 'step.failed': 'Failed',
    'refusal.unknown_key': 'Unknown signing key: this bundle was not signed with a release key the cloud trusts',
    'refusal.bad_signature': 'Bad signature: the bundle was changed after it was signed',
    'refusal.tampered': 'Tampered: a file in the bundle is not the one that was signed',
    'refusal.malformed': 'Not a release bundle',
    'refusal.unsupported_format': 'A bundle format newer than this cloud reads',
    'refusal.version_exists': 'This version was uploaded already with other contents: give the new bundle a new version',
    'refusal.bundle_too_large': 'The bundle is too large',
    'refusal.empty': 'The file is empty',
    'refusal.machine_in_rollout': 'A machine is in another rollout that is not over',
    'refusal.no_machines': 'That percentage selects no machine',
    'reason.heartbeat': 'its heartbeat says it runs the new version', 'reason.too_old': 'runs a version too old to upgrade from',
    'reason.downgrade': 'not above the highest version it installed (anti-rollback)', 'reason.wrong_device_type': 'the bundle is for another device type',
    'reason.busy': 'busy (water flowing or in maintenance)',
    'hist.open': 'Steps', 'hist.title': 'Update steps of {machine} (rollout {id})', 'hist.now': 'Current step',
    'hist.source.machine': 'machine report', 'hist.source.heartbeat': 'heartbeat', 'hist.source.cloud': 'cloud',
    'hist.repeats': '{n} times, last at {at}', 'hist.late': 'arrived late: current step unchanged', 'hist.other_version': 'version {version}',
    'hist.running': 'running {version}', 'hist.kept': 'In the order received; the newest {n} are kept per machine', 'hist.close': 'Close',
  },
});

const STEPS = ['pending', 'downloading', 'downloaded', 'verified', 'installed', 'deferred', 'switched', 'healthy',
  'rolled_back', 'refused', 'failed'];
const STEP_CLASS = { healthy: 'ok', rolled_back: 'bad', failed: 'bad', refused: 'amber', deferred: 'amber' };
const STATE_CLASS = { active: 'ok', paused: 'amber', stopped: 'bad', done: 'ok' };
const size = (n) => (n < 1048576 ? `${Math.max(1, Math.round(n / 1024))} KB` : `${(n / 1048576).toFixed(1)} MB`);
const known = (key) => t(key) !== key;
const aside = (words, more) => (state.lang === 'zh' ? `${words}（${more}）` : `${words} (${more})`);
/** A refusal in words (the server's own words after it, for the details). */
const refusal = (e) => (known(`refusal.${e.code}`) ? aside(t(`refusal.${e.code}`), e.serverMessage ?? e.message) : e.message);
/** A machine's reason code in words when it is one we know (the bundle's refusal codes, the heartbeat). */
const reason = (code) => (known(`reason.${code}`) ? t(`reason.${code}`) : known(`refusal.${code}`) ? t(`refusal.${code}`) : code);

export async function render(root, parts) {
  css('releases');
  if (parts[0]) return renderRollout(root, Number(parts[0]));
  const [{ releases }, { rollouts }] = await Promise.all([api('GET', '/api/v1/operator/releases'), api('GET', '/api/v1/operator/rollouts')]);
  const admin = can('admin');
  const progress = h('div', { class: 'upload', id: 'upload-progress', hidden: true, role: 'status' },
    h('span', { id: 'upload-text' }), h('progress', { id: 'upload-bar', max: 100, value: 0, 'aria-label': t('rel.upload') }));
  const file = h('input', { type: 'file', id: 'release-file', accept: '.bundle,application/octet-stream', hidden: true,
    onchange: () => { if (file.files[0]) upload(file.files[0], progress).finally(() => { file.value = ''; }); } });
  const uploadButton = admin ? h('button', { type: 'button', id: 'upload-release', onclick: () => file.click() }, t('rel.upload')) : null;
  const newRollout = admin ? h('button', { type: 'button', class: 'secondary', id: 'new-rollout', disabled: !releases.some((r) => !r.withdrawn_ms),
    onclick: () => createRollout(releases) }, t('ro.new')) : null;
  clear(root, heading(t('rel.title'), uploadButton, newRollout), file, progress,
    h('h2', {}, t('rel.releases')), releasesTable(releases, admin),
    h('h2', { class: 'gap' }, t('rel.rollouts')), rolloutsTable(rollouts, admin));
}

function releasesTable(releases, admin) {
  return table({
    rowKey: 'version', rows: releases, empty: t('rel.none'),
    columns: [
      { key: 'version', label: t('rel.version'), render: (r) => h('b', { class: 'mono' }, r.version) },
      { key: 'uploaded_ms', label: t('rel.uploaded_at'), render: (r) => h('span', { title: when(r.uploaded_ms) }, ago(r.uploaded_ms)) },
      { key: 'size_bytes', label: t('rel.size'), num: true, render: (r) => size(r.size_bytes) },
      { key: 'files', label: t('rel.files'), num: true, sort: false, render: (r) => String(r.manifest.file_count ?? '–') },
      { key: 'min', label: t('rel.min'), sort: false, render: (r) => h('span', { class: 'mono' }, r.manifest.min_version || '–') },
      { key: 'key_id', label: t('rel.key'), render: (r) => h('span', { class: 'mono small' }, r.key_id) },
      { key: 'notes', label: t('rel.notes'), wrap: true, sort: false, render: (r) => r.notes || '–' },
      { key: 'withdrawn_ms', label: t('rel.state'), render: (r) => h('span', { class: `chip ${r.withdrawn_ms ? 'bad' : 'ok'}` }, r.withdrawn_ms ? t('rel.withdrawn') : t('rel.active')) },
      ...(admin ? [{ key: 'actions', label: t('rel.actions'), sort: false, render: (r) => (r.withdrawn_ms ? '–' : h('div', { class: 'actions tight' },
        h('button', { type: 'button', class: 'secondary small', onclick: () => createRollout(releases, r.version) }, t('rel.rollout')),
        h('button', { type: 'button', class: 'secondary small', onclick: () => withdraw(r.version) }, t('rel.withdraw')))) }] : []),
    ] });
}

function rolloutsTable(rollouts, admin) {
  return table({
    rowKey: 'rollout_id', rows: rollouts, empty: t('ro.none'),
    columns: [
      { key: 'rollout_id', label: t('ro.id'), num: true, render: (r) => h('a', { href: `#/releases/${r.rollout_id}` }, `#${r.rollout_id}`) },
      { key: 'version', label: t('rel.version'), render: (r) => h('span', { class: 'mono' }, r.version) },
      { key: 'state', label: t('rel.state'), render: stateChip },
      { key: 'machine_count', label: t('ro.targets'), render: targets },
      { key: 'progress', label: t('ro.progress'), sort: false, render: bar },
      { key: 'counts', label: t('ro.steps'), sort: false, render: (r) => stepChips(r.counts) },
      { key: 'created_ms', label: t('ro.created'), render: (r) => h('span', { title: when(r.created_ms) }, ago(r.created_ms)) },
      ...(admin ? [{ key: 'actions', label: t('rel.actions'), sort: false, render: (r) => controls(r, refresh) }] : []),
    ] });
}

const stateChip = (r) => h('span', { class: `chip ${STATE_CLASS[r.state] || ''}`, title: r.stop_reason || null }, t(`ro.state.${r.state}`));
const targets = (r) => (r.percent ? t('ro.percent_n', { p: r.percent, n: r.machine_count }) : t('ro.machines_n', { n: r.machine_count }));
function bar(r) {
  const done = r.counts.healthy || 0;
  return h('div', { class: 'rollbar' }, h('progress', { max: r.machine_count || 1, value: done, 'aria-label': t('ro.progress') }),
    h('span', { class: 'small nowrap' }, t('ro.healthy_of', { done, n: r.machine_count })));
}
function stepChips(counts) {
  const shown = STEPS.filter((s) => counts[s]);
  return h('div', { class: 'chips' }, shown.map((s) => h('span', { class: `chip ${STEP_CLASS[s] || ''}`, dataset: { step: s } }, `${t(`step.${s}`)} ${counts[s]}`)));
}
function controls(r, after) {
  const change = (action, done) => act(() => api('POST', `/api/v1/operator/rollouts/${r.rollout_id}/${action}`), done).then(after);
  return h('div', { class: 'actions tight' },
    r.state === 'active' ? h('button', { type: 'button', class: 'secondary small', id: `pause-${r.rollout_id}`, onclick: () => change('pause', t('ro.paused')) }, t('ro.pause')) : null,
    r.state === 'paused' ? h('button', { type: 'button', class: 'secondary small', id: `resume-${r.rollout_id}`, onclick: () => change('resume', t('ro.resumed')) }, t('ro.resume')) : null,
    ['active', 'paused'].includes(r.state) ? h('button', { type: 'button', class: 'secondary small', id: `stop-${r.rollout_id}`, onclick: async () => {
      if (await confirmDialog(`${t('ro.stop')} #${r.rollout_id}`, t('ro.stop_text'), t('ro.stop'))) change('stop', t('ro.stopped_done'));
    } }, t('ro.stop')) : null);
}

/** The bundle file as the request body, with a progress bar (fetch cannot tell upload progress; XHR can). */
function upload(fileObj, box) {
  const text = box.querySelector('#upload-text');
  const barEl = box.querySelector('#upload-bar');
  box.hidden = false;
  box.className = 'upload';
  text.textContent = t('rel.uploading', { name: fileObj.name, pct: 0 });
  barEl.value = 0;
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/api/v1/operator/releases');
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.setRequestHeader('X-CSRF-Token', state.csrf);
    xhr.setRequestHeader('Accept', 'application/json');
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      const pct = Math.floor((100 * e.loaded) / e.total);
      barEl.value = pct;
      text.textContent = pct >= 100 ? t('rel.checking') : t('rel.uploading', { name: fileObj.name, pct });
    };
    xhr.onload = () => {
      let data = {};
      try { data = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status === 200) {
        toast(t('rel.uploaded', { version: data.version }));
        resolve(data);
        refresh();
        return;
      }
      box.className = 'upload bad';
      barEl.value = 0;
      const code = data.error || String(xhr.status), said = data.message || xhr.statusText;
      text.textContent = refusal({ code, message: refusalText(xhr.status, code, said), serverMessage: said });
      resolve(null);
    };
    xhr.onerror = () => { box.className = 'upload bad'; text.textContent = t('err.network'); resolve(null); };
    xhr.send(fileObj);
  });
}

async function withdraw(version) {
  if (await confirmDialog(`${t('rel.withdraw')} ${version}`, t('rel.withdraw_text', { version }), t('rel.withdraw'))) {
    await act(() => api('POST', `/api/v1/operator/releases/${encodeURIComponent(version)}/withdraw`), t('rel.withdrawn_done', { version }));
    refresh();
  }
}

function confirmDialog(title, text, ok) {
  return new Promise((resolve) => {
    const close = (v) => { dlg.close(); dlg.remove(); resolve(v); };
    const dlg = h('dialog', { 'aria-label': title }, h('form', { method: 'dialog', onsubmit: (e) => { e.preventDefault(); close(true); } },
      h('h2', {}, title), h('p', {}, text),
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'danger' }, ok),
        h('button', { type: 'button', class: 'secondary', onclick: () => close(false) }, t('cancel')))));
    dlg.addEventListener('cancel', () => resolve(false));
    document.body.append(dlg);
    dlg.showModal();
  });
}

/** Machines ticked in a table, or a percentage; the rollback limit. The server refuses a machine already in a
 *  rollout that is not over, and says which. */
async function createRollout(releases, version) {
  const { machines } = await api('GET', '/api/v1/operator/machines');
  const usable = releases.filter((r) => !r.withdrawn_ms);
  const err = h('div', { class: 'field-error', role: 'alert' });
  const versionSel = h('select', { name: 'version', id: 'rollout-version' }, usable.map((r) => h('option', { value: r.version, selected: r.version === version }, r.version)));
  const mode = h('select', { name: 'mode', id: 'rollout-mode', onchange: () => { pick.hidden = mode.value !== 'machines'; pctLabel.hidden = mode.value !== 'percent'; } },
    h('option', { value: 'machines' }, t('ro.by_machines')), h('option', { value: 'percent' }, t('ro.by_percent')));
  const ticks = table({ rowKey: 'machine_id', rows: machines, select: true, sortKey: 'machine_id', columns: [
    { key: 'machine_id', label: t('ro.machine'), render: (m) => h('span', { class: 'mono' }, m.machine_id) },
    { key: 'location', label: t('ro.location'), wrap: true, sort: false },
    { key: 'version', label: t('ro.running'), sort: false, render: (m) => h('span', { class: 'mono small' }, m.heartbeat?.software_version || '–') },
  ] });
  ticks.onselect = () => { err.textContent = ''; };
  const pick = h('div', { class: 'pick' }, ticks);
  const percent = h('input', { name: 'percent', id: 'rollout-percent', type: 'number', min: 1, max: 100, value: 10 });
  const pctLabel = h('label', { hidden: true }, t('ro.percent'), percent);
  const maxRb = h('input', { name: 'max_rollback_pct', id: 'rollout-max-rb', type: 'number', min: 0, max: 100, value: 20 });
  const dlg = h('dialog', { 'aria-label': t('ro.new'), class: 'wide' });
  const form = h('form', { method: 'dialog', novalidate: true }, h('h2', {}, t('ro.new')),
    h('label', {}, t('rel.version'), versionSel), h('label', {}, t('ro.choose'), mode), pick, pctLabel,
    h('label', {}, t('ro.max_rb_label'), maxRb), err,
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'rollout-go' }, t('ro.create')),
      h('button', { type: 'button', class: 'secondary', onclick: () => { dlg.close(); dlg.remove(); } }, t('cancel'))));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    err.textContent = '';
    const body = { version: versionSel.value, max_rollback_pct: Number(maxRb.value) };
    if (mode.value === 'machines') {
      const ticked = [...ticks.selected];
      if (!ticked.length) { err.textContent = t('ro.tick'); return; }
      body.machine_ids = ticked;
    } else body.percent = Number(percent.value);
    try {
      const made = await api('POST', '/api/v1/operator/rollouts', body);
      dlg.close(); dlg.remove();
      toast(t('ro.created_done', { id: made.rollout_id, n: made.machine_count }));
      refresh();
    } catch (x) {
      err.textContent = x.code === 'machine_in_rollout' ? `${t('refusal.machine_in_rollout')}：${(x.body.machines || []).join(', ')}` : refusal(x);
    }
  });
  dlg.append(form);
  dlg.addEventListener('cancel', () => dlg.remove());
  document.body.append(dlg);
  dlg.showModal();
}

async function renderRollout(root, id) {
  const r = await api('GET', `/api/v1/operator/rollouts/${id}`);
  const admin = can('admin');
  clear(root, h('p', {}, h('a', { href: '#/releases' }, `← ${t('ro.back')}`)),
    heading(t('ro.detail', { id: r.rollout_id, version: r.version }), admin ? controls(r, refresh) : null),
    h('div', { class: 'card' }, h('dl', { class: 'facts' },
      h('dt', {}, t('rel.state')), h('dd', {}, stateChip(r), r.stop_reason ? h('span', { class: 'muted small' }, ` ${r.stop_reason}`) : null),
      h('dt', {}, t('ro.targets')), h('dd', {}, targets(r)),
      h('dt', {}, t('ro.progress')), h('dd', {}, bar(r)),
      h('dt', {}, t('ro.steps')), h('dd', {}, stepChips(r.counts)),
      h('dt', {}, t('ro.max_rb')), h('dd', {}, `${r.max_rollback_pct}%`),
      h('dt', {}, t('ro.created')), h('dd', {}, `${when(r.created_ms)} · ${r.created_by}`))),
    table({ rowKey: 'machine_id', rows: r.machines, sortKey: 'machine_id', columns: [
      { key: 'machine_id', label: t('ro.machine'), render: (m) => h('a', { href: `#/machines/${encodeURIComponent(m.machine_id)}`, class: 'mono' }, m.machine_id) },
      { key: 'step', label: t('ro.step'), render: (m) => h('span', { class: `chip ${STEP_CLASS[m.step] || ''}` }, t(`step.${m.step}`)) },
      { key: 'reason', label: t('ro.reason'), wrap: true, render: (m) => (m.reason || m.detail ? [m.reason ? h('span', { title: m.reason }, reason(m.reason)) : null,
        m.detail ? h('span', { class: 'muted small' }, ` ${m.detail}`) : null] : '–') },
      { key: 'heartbeat_version', label: t('ro.running'), render: (m) => h('span', { class: 'mono small' }, m.heartbeat_version || m.running_version || '–') },
      { key: 'updated_ms', label: t('ro.updated'), render: (m) => h('span', { title: when(m.updated_ms) }, ago(m.updated_ms)) },
      { key: 'history', label: t('hist.open'), sort: false, render: (m) => h('button', { type: 'button', class: 'secondary small history',
        'aria-label': `${t('hist.open')} ${m.machine_id}`, onclick: () => showHistory(r.rollout_id, m.machine_id) }, t('hist.open')) },
    ] }));
}

const stepChip = (step) => h('span', { class: `chip ${STEP_CLASS[step] || ''}`, dataset: { step } }, t(`step.${step}`));

/** One machine's steps as the cloud received them, oldest first: when, which step, who said so (the machine's
 *  report, its heartbeat, the cloud), the reason and detail; a report that arrived after a later step (its
 *  heartbeat overtook it) is marked, since it did not change the current step. */
async function showHistory(rolloutId, machineId) {
  const hist = await api('GET', `/api/v1/operator/rollouts/${rolloutId}/machines/${encodeURIComponent(machineId)}/steps`);
  const title = t('hist.title', { machine: machineId, id: rolloutId });
  const dlg = h('dialog', { 'aria-label': title, class: 'wide history', id: 'step-history' });
  const close = () => { dlg.close(); dlg.remove(); };
  const item = (x) => h('li', { class: x.applied ? '' : 'late', dataset: { stepId: x.step_id, step: x.step } },
    h('div', { class: 'line' }, h('span', { class: 'small' }, when(x.at_ms)), stepChip(x.step),
      h('span', { class: 'muted small' }, t(`hist.source.${x.source}`)),
      x.version !== hist.version ? h('span', { class: 'muted small mono' }, t('hist.other_version', { version: x.version })) : null,
      x.running_version ? h('span', { class: 'muted small' }, t('hist.running', { version: x.running_version })) : null,
      x.applied ? null : h('span', { class: 'chip amber late-mark' }, t('hist.late'))),
    x.reason || x.repeats > 1 ? h('div', { class: 'small muted why' },
      x.reason ? h('span', { class: 'reason', title: x.reason }, reason(x.reason)) : null,
      x.repeats > 1 ? h('span', { class: 'repeats' }, t('hist.repeats', { n: x.repeats, at: when(x.last_at_ms) })) : null) : null,
    x.detail ? h('div', { class: 'detail' }, x.detail) : null);
  dlg.append(h('form', { method: 'dialog', onsubmit: (e) => { e.preventDefault(); close(); } },
    h('h2', {}, title),
    h('div', { class: 'line' }, h('span', {}, `${t('hist.now')}${state.lang === 'zh' ? '：' : ':'}`), stepChip(hist.step),
      h('span', { class: 'muted small' }, when(hist.updated_ms))),
    h('ol', { class: 'steps', tabindex: 0, 'aria-label': title }, hist.steps.map(item)),   // it scrolls: keyboard too
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'history-close' }, t('hist.close')),
      h('span', { class: 'muted small' }, t('hist.kept', { n: hist.max_rows })))));
  dlg.addEventListener('cancel', () => dlg.remove());
  document.body.append(dlg);
  dlg.showModal();
}
