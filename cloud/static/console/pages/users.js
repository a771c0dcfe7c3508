// Users, masked by default: search by phone number or user id; a user (#/users/<id>) with their balance and points
// and the entries that made them, sessions, bills, top-ups and refunds. Reviewers and admins may show the full phone
// number and real name, giving a reason the server writes to the audit log first; admins adjust a balance or points.
import { t, addStrings, api, h, clear, table, dialog, toast, heading, when, fen, litres, qs, can, css } from '../lib.js';
import { refresh } from '../app.js';
import { named, stateChip } from './sessions.js';

addStrings({
  zh: {
    'usr.title': '用户', 'usr.q': '手机号或用户 ID', 'usr.search': '查找', 'usr.all': '全部用户', 'usr.id': '用户 ID',
    'usr.phone': '手机号', 'usr.name': '姓名', 'usr.identity': '实名', 'usr.balance': '可用余额', 'usr.held': '冻结中',
    'usr.points': '积分', 'usr.created': '注册时间', 'usr.deleted': '已注销', 'usr.deleted_at': '注销时间', 'usr.more': '更多用户',
    'usr.open': '查看', 'usr.back': '返回列表', 'usr.facts': '基本信息', 'usr.doc': '证件', 'usr.number': '证件号码',
    'usr.masked_note': '手机号和姓名默认隐藏部分内容。', 'usr.unmask': '显示完整信息', 'usr.unmask_title': '显示 {id} 的完整手机号和姓名',
    'usr.unmask_text': '查看会连同原因记入审计日志。', 'usr.unmask_reason': '原因（例如：客服来电核实）',
    'usr.unmasked': '已显示完整信息（已记入审计日志）', 'usr.adjust': '调整余额/积分', 'usr.adjust_title': '调整 {id}',
    'usr.adjust_kind': '调整项目', 'usr.adjust_balance': '余额（元）', 'usr.adjust_points': '积分',
    'usr.adjust_amount': '数量（负数为扣减；余额以元为单位）', 'usr.adjust_reason': '原因（记入审计日志）',
    'usr.adjusted': '已调整：{what}', 'usr.deleted_note': '此账户已注销：个人信息已删除，资金和用水记录按规定保留。',
    'usr.tab.balance': '余额流水', 'usr.tab.points': '积分记录', 'usr.tab.sessions': '用水记录', 'usr.tab.bills': '账单',
    'usr.tab.topups': '充值', 'usr.tab.refunds': '退款', 'usr.at': '时间', 'usr.kind': '类型', 'usr.amount': '金额',
    'usr.after': '变动后', 'usr.session': '用水记录', 'usr.note': '备注', 'usr.delta': '变动', 'usr.ref': '关联',
    'usr.order': '订单号', 'usr.provider': '渠道', 'usr.state': '状态', 'usr.paid': '支付时间', 'usr.refunded': '已退',
    'usr.origin': '来源', 'usr.newest': '显示最新 {n} 条', 'usr.all_sessions': '查看此用户的全部用水记录',
    'usr.manual': '人工退款（注销）', 'usr.reference': '凭证',
    'ident.none': '未实名', 'ident.pending': '待审核', 'ident.verified': '已实名', 'ident.rejected': '已驳回',
    'pkind.earn': '消费获得', 'pkind.redeem': '兑换礼品', 'pkind.adjust': '人工调整',
    'origin.withdrawal': '用户提现', 'origin.deletion': '注销退款', 'origin.session': '用水退款',
  },
  en: {
    'usr.title': 'Users', 'usr.q': 'Phone or user ID', 'usr.search': 'Find', 'usr.all': 'All users', 'usr.id': 'User ID',
    'usr.phone': 'Phone', 'usr.name': 'Name', 'usr.identity': 'Real name', 'usr.balance': 'Available', 'usr.held': 'Held',
    'usr.points': 'Points', 'usr.created': 'Signed up', 'usr.deleted': 'Deleted', 'usr.deleted_at': 'Deleted', 'usr.more': 'More users',
    'usr.open': 'Open', 'usr.back': 'Back to the list', 'usr.facts': 'Facts', 'usr.doc': 'Document', 'usr.number': 'Document number',
    'usr.masked_note': 'Phone numbers and names are partly hidden.', 'usr.unmask': 'Show in full', 'usr.unmask_title': 'Show {id}\u2019s full phone and name',
    'usr.unmask_text': 'The view is written to the audit log with the reason.', 'usr.unmask_reason': 'Reason (e.g. the customer called support)',
    'usr.unmasked': 'Shown in full (written to the audit log)', 'usr.adjust': 'Adjust balance or points', 'usr.adjust_title': 'Adjust {id}',
    'usr.adjust_kind': 'What', 'usr.adjust_balance': 'Balance (¥)', 'usr.adjust_points': 'Points',
    'usr.adjust_amount': 'Amount (negative takes away; balance in yuan)', 'usr.adjust_reason': 'Reason (written to the audit log)',
    'usr.adjusted': 'Adjusted: {what}', 'usr.deleted_note': 'This account was deleted: personal data is erased; money and rental records are kept as the law requires.',
    'usr.tab.balance': 'Balance', 'usr.tab.points': 'Points', 'usr.tab.sessions': 'Rental records', 'usr.tab.bills': 'Bills',
    'usr.tab.topups': 'Top-ups', 'usr.tab.refunds': 'Refunds', 'usr.at': 'Time', 'usr.kind': 'Kind', 'usr.amount': 'Amount',
    'usr.after': 'After', 'usr.session': 'Record', 'usr.note': 'Note', 'usr.delta': 'Change', 'usr.ref': 'For',
    'usr.order': 'Order', 'usr.provider': 'Provider', 'usr.state': 'State', 'usr.paid': 'Paid', 'usr.refunded': 'Refunded',
    'usr.origin': 'Why', 'usr.newest': 'The newest {n}', 'usr.all_sessions': 'All rental records of this user',
    'usr.manual': 'Manual refunds (deleted account)', 'usr.reference': 'Reference',
    'ident.none': 'Not registered', 'ident.pending': 'Waiting', 'ident.verified': 'Registered', 'ident.rejected': 'Rejected',
    'pkind.earn': 'Earned', 'pkind.redeem': 'Redeemed', 'pkind.adjust': 'Adjusted',
    'origin.withdrawal': 'Withdrawal', 'origin.deletion': 'Account deleted', 'origin.session': 'Session refund',
  },
});

const TABS = ['balance', 'points', 'sessions', 'bills', 'topups', 'refunds'];
const path = (id) => `/api/v1/operator/users/${encodeURIComponent(id)}`;
const userLink = (id) => h('a', { href: `#/users/${encodeURIComponent(id)}`, class: 'mono' }, id);
const sessionLink = (id) => (id ? h('a', { href: `#/sessions/${encodeURIComponent(id)}`, class: 'mono' }, id) : '');
const identChip = (s) => h('span', { class: `chip ${s === 'verified' ? 'ok' : s === 'rejected' ? 'bad' : s === 'pending' ? 'amber' : ''}` }, named('ident', s));
const at = (ms) => h('span', { class: 'nowrap' }, when(ms));

export async function render(root, parts, query) {
  css('sessions');
  if (parts[0]) return one(root, parts[0], query);
  const q = query.get('q') || '';
  const first = await api('GET', `/api/v1/operator/users${qs({ q, limit: 50 })}`);
  let rows = first.users;
  const input = h('input', { name: 'q', id: 'user-q', value: q, maxlength: 64, inputmode: 'search' });
  const form = h('form', { class: 'filters', id: 'user-search' }, h('label', {}, t('usr.q'), input),
    h('button', { type: 'submit' }, t('usr.search')), q ? h('a', { class: 'button secondary', href: '#/users' }, t('usr.all')) : null);
  form.addEventListener('submit', (e) => { e.preventDefault(); location.hash = `#/users${qs({ q: input.value.trim() })}`; });
  const tbl = table({ rows, rowKey: 'user_id', columns: [
    { key: 'user_id', label: t('usr.id'), render: (u) => userLink(u.user_id) },
    { key: 'phone_masked', label: t('usr.phone'), render: (u) => (u.deleted_ms ? h('span', { class: 'chip bad' }, t('usr.deleted')) : h('span', { class: 'mono' }, u.phone_masked)) },
    { key: 'name_masked', label: t('usr.name'), wrap: true },
    { key: 'identity_state', label: t('usr.identity'), render: (u) => identChip(u.identity_state) },
    { key: 'available_fen', label: t('usr.balance'), num: true, render: (u) => fen(u.available_fen) },
    { key: 'points', label: t('usr.points'), num: true },
    { key: 'created_ms', label: t('usr.created'), render: (u) => at(u.created_ms) },
    { key: 'open', label: '', sort: false, render: (u) => h('a', { class: 'button secondary small', href: `#/users/${encodeURIComponent(u.user_id)}` }, t('usr.open')) },
  ] });
  let next = first.next_before;
  const more = h('button', { type: 'button', class: 'secondary', id: 'more', hidden: !next, onclick: async () => {
    const page = await api('GET', `/api/v1/operator/users${qs({ q, before: next, limit: 50 })}`);
    rows = rows.concat(page.users);
    next = page.next_before;
    more.hidden = !next;
    tbl.redraw(rows);
  } }, t('usr.more'));
  clear(root, heading(t('usr.title')), form, h('p', { class: 'muted small' }, t('usr.masked_note')), tbl, h('div', { class: 'pager' }, more));
}

async function one(root, id, query) {
  const tab = TABS.includes(query.get('tab')) ? query.get('tab') : 'balance';
  const r = await api('GET', path(id));
  const u = r.user;
  const deleted = u.deleted_ms !== null;
  const phone = h('dd', { id: 'phone', class: 'mono' }, deleted ? '–' : u.phone_masked);
  const name = h('dd', { id: 'name' }, deleted ? '–' : u.name_masked || '–');
  const unmask = async () => {
    const full = await dialog({ title: t('usr.unmask_title', { id }), text: t('usr.unmask_text'), ok: t('usr.unmask'),
      fields: [{ name: 'reason', label: t('usr.unmask_reason'), type: 'textarea', required: true, maxlength: 200 }],
      submit: (v) => api('POST', `${path(id)}/unmask`, { reason: v.reason }) });
    if (!full) return;
    phone.textContent = full.phone;
    name.textContent = full.name || '–';
    phone.classList.add('unmasked');
    name.classList.add('unmasked');
    document.getElementById('unmask')?.remove();
    toast(t('usr.unmasked'));
  };
  const adjust = async () => {
    const done = await dialog({ title: t('usr.adjust_title', { id }), ok: t('usr.adjust'), fields: [
      { name: 'kind', label: t('usr.adjust_kind'), type: 'select', value: 'balance',
        options: [['balance', t('usr.adjust_balance')], ['points', t('usr.adjust_points')]] },
      { name: 'amount', label: t('usr.adjust_amount'), type: 'number', required: true, step: 'any', inputmode: 'decimal' },
      { name: 'reason', label: t('usr.adjust_reason'), type: 'textarea', required: true, maxlength: 200 }],
    submit: (v) => api('POST', `${path(id)}/adjustments`, { kind: v.kind, reason: v.reason,
      amount: v.kind === 'balance' ? Math.round(v.amount * 100) : Math.round(v.amount) }) });
    if (done) {
      toast(t('usr.adjusted', { what: done.kind === 'balance' ? fen(done.amount) : `${done.amount} ${t('usr.points')}` }));
      refresh();
    }
  };
  const fact = (label, value) => [h('dt', {}, t(label)), h('dd', {}, value ?? '–')];
  const ident = r.identity;
  const facts = h('section', { class: 'card' }, h('h2', {}, t('usr.facts')), h('dl', { class: 'facts' },
    fact('usr.id', h('span', { class: 'mono' }, u.user_id)),
    h('dt', {}, t('usr.phone')), phone, h('dt', {}, t('usr.name')), name,
    fact('usr.identity', identChip(u.identity_state)),
    ident ? fact('usr.number', h('span', { class: 'mono' }, ident.number_masked)) : null,
    fact('usr.created', when(u.created_ms)),
    deleted ? fact('usr.deleted_at', when(u.deleted_ms)) : null),
  deleted ? h('p', { class: 'bad', id: 'deleted-note' }, t('usr.deleted_note')) : h('p', { class: 'muted small' }, t('usr.masked_note')),
  h('div', { class: 'actions' },
    !deleted && can('reviewer') ? h('button', { type: 'button', class: 'secondary', id: 'unmask', onclick: unmask }, t('usr.unmask')) : null,
    !deleted && can('admin') ? h('button', { type: 'button', class: 'secondary', id: 'adjust', onclick: adjust }, t('usr.adjust')) : null));
  const stats = h('div', { class: 'stats', id: 'user-stats' },
    h('div', { class: 'stat', id: 'stat-balance' }, h('b', {}, fen(u.available_fen)), h('span', {}, t('usr.balance'))),
    h('div', { class: 'stat' }, h('b', {}, fen(u.held_fen)), h('span', {}, t('usr.held'))),
    h('div', { class: 'stat', id: 'stat-points' }, h('b', {}, String(u.points)), h('span', {}, t('usr.points'))));
  const tabs = h('nav', { class: 'tabs' }, TABS.map((x) => h('a', { href: `#/users/${encodeURIComponent(id)}?tab=${x}`, id: `tab-${x}`,
    'aria-current': x === tab ? 'page' : null }, t(`usr.tab.${x}`))));
  clear(root, heading(`${t('usr.title')} · ${id}`, h('a', { class: 'button secondary', href: '#/users' }, t('usr.back'))),
    h('div', { class: 'cols' }, facts, h('div', {}, stats)), tabs, section(tab, r, id),
    truncated(r) ? h('p', { class: 'muted small' }, t('usr.newest', { n: r.limit })) : null);
}

/** Whether a list stopped at the limit (older entries exist). */
function truncated(r) {
  return ['balance_entries', 'points_entries', 'sessions', 'bills', 'topups', 'provider_refunds'].some((k) => r[k].length >= r.limit);
}

function section(tab, r, id) {
  if (tab === 'balance') {
    return table({ rows: r.balance_entries, rowKey: 'entry_id', columns: [
      { key: 'created_ms', label: t('usr.at'), render: (e) => at(e.created_ms) },
      { key: 'kind', label: t('usr.kind'), render: (e) => named('kind', e.kind) },
      { key: 'amount_fen', label: t('usr.amount'), num: true, render: (e) => fen(e.amount_fen) },
      { key: 'balance_after_fen', label: t('usr.after'), num: true, render: (e) => fen(e.balance_after_fen) },
      { key: 'session_id', label: t('usr.session'), render: (e) => sessionLink(e.session_id) },
      { key: 'note', label: t('usr.note'), wrap: true }] });
  }
  if (tab === 'points') {
    return table({ rows: r.points_entries, rowKey: 'id', columns: [
      { key: 'created_ms', label: t('usr.at'), render: (e) => at(e.created_ms) },
      { key: 'kind', label: t('usr.kind'), render: (e) => named('pkind', e.kind) },
      { key: 'delta', label: t('usr.delta'), num: true, render: (e) => (e.delta > 0 ? `+${e.delta}` : String(e.delta)) },
      { key: 'points_after', label: t('usr.after'), num: true },
      { key: 'ref', label: t('usr.ref'), render: (e) => (e.kind === 'earn' ? sessionLink(e.ref) : h('span', { class: 'mono' }, e.ref || '')) },
      { key: 'note', label: t('usr.note'), wrap: true }] });
  }
  if (tab === 'sessions') {
    return [table({ rows: r.sessions, rowKey: 'session_id', columns: [
      { key: 'created_ms', label: t('ses.when'), render: (s) => h('a', { href: `#/sessions/${encodeURIComponent(s.session_id)}`, class: 'nowrap' }, when(s.created_ms)) },
      { key: 'machine_id', label: t('ses.machine'), render: (s) => h('a', { href: `#/machines/${encodeURIComponent(s.machine_id)}` }, s.machine_id) },
      { key: 'state', label: t('ses.state'), render: (s) => stateChip(s.state) },
      { key: 'end_reason', label: t('ses.reason'), render: (s) => named('reason', s.end_reason) },
      { key: 'volume_ml', label: t('ses.volume'), num: true, render: (s) => litres(s.volume_ml) },
      { key: 'fee_fen', label: t('ses.fee'), num: true, render: (s) => fen(s.fee_fen) }] }),
    h('p', {}, h('a', { href: `#/sessions${qs({ user: id, from: '' })}`, id: 'all-sessions' }, t('usr.all_sessions')))];
  }
  if (tab === 'bills') {
    return table({ rows: r.bills, rowKey: 'session_id', columns: [
      { key: 'created_ms', label: t('usr.at'), render: (b) => at(b.created_ms) },
      { key: 'session_id', label: t('usr.session'), render: (b) => sessionLink(b.session_id) },
      { key: 'machine_id', label: t('ses.machine') },
      { key: 'volume_ml', label: t('ses.volume'), num: true, render: (b) => litres(b.volume_ml) },
      { key: 'amount_fen', label: t('usr.amount'), num: true, render: (b) => fen(b.amount_fen) },
      { key: 'refunded_fen', label: t('usr.refunded'), num: true, render: (b) => (b.refunded_fen ? fen(b.refunded_fen) : '–') },
      { key: 'points', label: t('usr.points'), num: true },
      { key: 'end_reason', label: t('ses.reason'), render: (b) => named('reason', b.end_reason) }] });
  }
  if (tab === 'topups') {
    return table({ rows: r.topups, rowKey: 'order_id', columns: [
      { key: 'created_ms', label: t('usr.at'), render: (o) => at(o.created_ms) },
      { key: 'order_id', label: t('usr.order'), render: (o) => h('span', { class: 'mono' }, o.order_id) },
      { key: 'provider', label: t('usr.provider') },
      { key: 'amount_fen', label: t('usr.amount'), num: true, render: (o) => fen(o.amount_fen) },
      { key: 'state', label: t('usr.state'), render: (o) => h('span', { class: `chip ${o.state === 'paid' ? 'ok' : ''}` }, o.state) },
      { key: 'paid_ms', label: t('usr.paid'), render: (o) => at(o.paid_ms) },
      { key: 'refunded_fen', label: t('usr.refunded'), num: true, render: (o) => (o.refunded_fen ? fen(o.refunded_fen) : '–') }] });
  }
  return [table({ rows: r.provider_refunds, rowKey: 'refund_id', columns: [
    { key: 'created_ms', label: t('usr.at'), render: (x) => at(x.created_ms) },
    { key: 'origin', label: t('usr.origin'), render: (x) => named('origin', x.origin) },
    { key: 'provider', label: t('usr.provider') },
    { key: 'amount_fen', label: t('usr.amount'), num: true, render: (x) => fen(x.amount_fen) },
    { key: 'state', label: t('usr.state'), render: (x) => h('span', { class: `chip ${x.state === 'success' ? 'ok' : x.state === 'abnormal' ? 'bad' : 'amber'}` }, x.state) },
    { key: 'reason', label: t('usr.note'), wrap: true }] }),
  r.balance_refunds.length ? [h('h3', {}, t('usr.manual')), table({ rows: r.balance_refunds, rowKey: 'refund_id', columns: [
    { key: 'created_ms', label: t('usr.at'), render: (x) => at(x.created_ms) },
    { key: 'amount_fen', label: t('usr.amount'), num: true, render: (x) => fen(x.amount_fen) },
    { key: 'state', label: t('usr.state') },
    { key: 'reference', label: t('usr.reference'), wrap: true }] })] : null];
}
