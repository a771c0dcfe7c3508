// Identity review (reviewers and admins): the queue of real-name registrations waiting, oldest first; opening one
// shows the name and number in full and, on a deliberate click, the document photo (each view is audit-logged by
// the server); approve, or reject with a reason the user sees on their phone.
import { t, addStrings, api, h, clear, table, dialog, toast, heading, when, ago, qs } from '../lib.js';

addStrings({
  zh: {
    'idr.title': '实名审核', 'idr.pending': '待审核', 'idr.verified': '已通过', 'idr.rejected': '已驳回',
    'idr.user': '用户', 'idr.doc': '证件', 'idr.name': '姓名', 'idr.number': '证件号码', 'idr.submitted': '提交时间',
    'idr.decided': '审核时间', 'idr.reason': '驳回原因', 'idr.open': '审核', 'idr.empty': '没有待审核的登记',
    'idr.photo': '证件照片', 'idr.show_photo': '查看证件照片', 'idr.photo_note': '每次查看都会记入审计日志。',
    'idr.no_photo': '照片已删除（超过保存期限）或未上传', 'idr.approve': '通过', 'idr.reject': '驳回',
    'idr.reject_title': '驳回实名登记', 'idr.reject_reason': '原因（用户会看到）', 'idr.approved_msg': '已通过 {user} 的实名登记',
    'idr.rejected_msg': '已驳回 {user} 的实名登记', 'idr.back': '返回列表', 'idr.state': '状态', 'idr.waiting': '已等待',
    'doc.resident_id': '居民身份证', 'doc.passport': '护照', 'doc.hk_macau_permit': '港澳居民来往内地通行证',
    'doc.taiwan_permit': '台湾居民来往大陆通行证',
  },
  en: {
    'idr.title': 'ID review', 'idr.pending': 'Waiting', 'idr.verified': 'Approved', 'idr.rejected': 'Rejected',
    'idr.user': 'User', 'idr.doc': 'Document', 'idr.name': 'Name', 'idr.number': 'Number', 'idr.submitted': 'Submitted',
    'idr.decided': 'Decided', 'idr.reason': 'Reason', 'idr.open': 'Review', 'idr.empty': 'No registrations waiting',
    'idr.photo': 'Document photo', 'idr.show_photo': 'Show the document photo', 'idr.photo_note': 'Every view is written to the audit log.',
    'idr.no_photo': 'The photo was deleted (past its retention) or never uploaded', 'idr.approve': 'Approve', 'idr.reject': 'Reject',
    'idr.reject_title': 'Reject the registration', 'idr.reject_reason': 'Reason (the user sees it)', 'idr.approved_msg': '{user} approved',
    'idr.rejected_msg': '{user} rejected', 'idr.back': 'Back to the list', 'idr.state': 'State', 'idr.waiting': 'Waiting for',
    'doc.resident_id': 'Resident ID card', 'doc.passport': 'Passport', 'doc.hk_macau_permit': 'Home-return permit (HK/Macau)',
    'doc.taiwan_permit': 'Taiwan compatriot permit',
  },
});

const STATES = ['pending', 'verified', 'rejected'];
const docName = (d) => { const k = `doc.${d}`; const s = t(k); return s === k ? d : s; };

export async function render(root, parts, query) {
  if (parts[0]) return one(root, parts[0]);
  const state = STATES.includes(query.get('state')) ? query.get('state') : 'pending';
  const { pending: rows } = await api('GET', `/api/v1/operator/identities${qs({ state, limit: 200 })}`);
  const open = (r) => { location.hash = `#/identity/${encodeURIComponent(r.user_id)}`; };
  const columns = [
    { key: 'user_id', label: t('idr.user'), render: (r) => h('a', { href: `#/identity/${encodeURIComponent(r.user_id)}` }, r.user_id) },
    { key: 'doc_type', label: t('idr.doc'), render: (r) => docName(r.doc_type) },
    { key: 'name_masked', label: t('idr.name') },
    { key: 'number_masked', label: t('idr.number'), render: (r) => h('span', { class: 'mono' }, r.number_masked) },
    { key: 'submitted_ms', label: t('idr.submitted'), render: (r) => when(r.submitted_ms) },
    state === 'pending'
      ? { key: 'waiting', label: t('idr.waiting'), sort: false, render: (r) => ago(r.submitted_ms) }
      : { key: 'decided_ms', label: t('idr.decided'), render: (r) => when(r.decided_ms) },
    state === 'rejected' ? { key: 'reject_reason', label: t('idr.reason'), wrap: true } : null,
    state === 'pending' ? { key: 'open', label: '', sort: false, render: (r) => h('button', { type: 'button', class: 'small', onclick: () => open(r) }, t('idr.open')) } : null,
  ].filter(Boolean);
  clear(root, heading(t('idr.title')),
    h('nav', { class: 'tabs' }, STATES.map((s) => h('a', { href: `#/identity?state=${s}`, 'aria-current': s === state ? 'page' : null }, t(`idr.${s}`)))),
    table({ rows, rowKey: 'user_id', columns, empty: state === 'pending' ? t('idr.empty') : undefined }));
}

async function one(root, userId) {
  const r = await api('GET', `/api/v1/operator/identities/${encodeURIComponent(userId)}`);
  const photoBox = h('div', { id: 'photo' });
  const showPhoto = () => {
    const img = h('img', { src: `/api/v1/operator/identities/${encodeURIComponent(userId)}/photo?v=${Date.now()}`, alt: t('idr.photo'), class: 'idphoto' });
    img.addEventListener('error', () => clear(photoBox, h('p', { class: 'bad' }, t('idr.no_photo'))));
    clear(photoBox, img);
  };
  const decide = async (approve) => {
    if (approve) {
      try {
        await api('POST', `/api/v1/operator/identities/${encodeURIComponent(userId)}/review`, { approve: true, reason: '' });
        toast(t('idr.approved_msg', { user: userId }));
        location.hash = '#/identity';
      } catch (e) { toast(e.message, true); }
      return;
    }
    const done = await dialog({ title: t('idr.reject_title'), danger: true, ok: t('idr.reject'),
      fields: [{ name: 'reason', label: t('idr.reject_reason'), type: 'textarea', required: true, maxlength: 200 }],
      submit: (v) => api('POST', `/api/v1/operator/identities/${encodeURIComponent(userId)}/review`, { approve: false, reason: v.reason }) });
    if (done) { toast(t('idr.rejected_msg', { user: userId })); location.hash = '#/identity'; }
  };
  clear(root, heading(`${t('idr.title')} · ${userId}`, h('a', { class: 'button secondary', href: '#/identity' }, t('idr.back'))),
    h('div', { class: 'cols' },
      h('section', { class: 'card' }, h('dl', { class: 'facts' },
        h('dt', {}, t('idr.state')), h('dd', {}, h('span', { class: `chip ${r.state === 'verified' ? 'ok' : r.state === 'rejected' ? 'bad' : 'amber'}` }, t(`idr.${r.state}`))),
        h('dt', {}, t('idr.doc')), h('dd', {}, docName(r.doc_type)),
        h('dt', {}, t('idr.name')), h('dd', { id: 'full-name' }, r.name),
        h('dt', {}, t('idr.number')), h('dd', { id: 'full-number', class: 'mono' }, r.number),
        h('dt', {}, t('idr.submitted')), h('dd', {}, when(r.submitted_ms)),
        r.decided_ms ? [h('dt', {}, t('idr.decided')), h('dd', {}, when(r.decided_ms))] : null,
        r.reject_reason ? [h('dt', {}, t('idr.reason')), h('dd', {}, r.reject_reason)] : null),
      r.state === 'pending' ? h('div', { class: 'actions' },
        h('button', { type: 'button', id: 'approve', onclick: () => decide(true) }, t('idr.approve')),
        h('button', { type: 'button', class: 'danger', id: 'reject', onclick: () => decide(false) }, t('idr.reject'))) : null),
      h('section', { class: 'card' }, h('h2', {}, t('idr.photo')), h('p', { class: 'muted small' }, t('idr.photo_note')),
        r.photo_stored ? [photoBox, h('div', { class: 'actions' }, h('button', { type: 'button', class: 'secondary', id: 'show-photo', onclick: showPhoto }, t('idr.show_photo')))]
          : h('p', { class: 'muted' }, t('idr.no_photo')))));
}
