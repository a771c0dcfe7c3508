// Alarms: what operators must look at, open -> acknowledged (with a note) -> resolved (by an operator with a note,
// or by the system when the condition cleared); filtered by state, rule and machine; each alarm's history.
import { state as ui, t, addStrings, api, h, clear, table, dialog, toast, heading, when, ago, can, qs } from '../lib.js';
import { refresh } from '../app.js';

addStrings({
  zh: {
    'al.title': '告警', 'al.active': '未处理', 'al.open': '新告警', 'al.acknowledged': '已确认', 'al.resolved': '已解决',
    'al.rule': '类型', 'al.machine': '设备', 'al.severity': '级别', 'al.opened': '发生时间', 'al.last': '最近一次',
    'al.state': '状态', 'al.detail': '详情', 'al.ack': '确认', 'al.resolve': '解决', 'al.note': '备注（其他操作员可见）',
    'al.ack_title': '确认告警', 'al.resolve_title': '解决告警', 'al.acked_msg': '告警已确认', 'al.resolved_msg': '告警已解决',
    'al.by': '{who}，{when}', 'al.system': '系统（情况已恢复）', 'al.any': '全部', 'al.filter': '筛选', 'al.back': '返回列表',
    'al.notified': '通知', 'al.email': '邮件', 'al.webhook': 'Webhook', 'al.more': '更早的告警',
    'al.n_off': '未配置', 'al.n_sent': '已发送', 'al.n_sending': '发送中', 'al.n_not_sent': '未发送（重试中）', 'al.n_gave_up': '多次失败，已放弃',
    'sev.critical': '严重', 'sev.warning': '警告', 'sev.info': '提示', 'al.service': '服务',
  },
  en: {
    'al.title': 'Alarms', 'al.active': 'Active', 'al.open': 'New', 'al.acknowledged': 'Acknowledged', 'al.resolved': 'Resolved',
    'al.rule': 'Kind', 'al.machine': 'Machine', 'al.severity': 'Severity', 'al.opened': 'Raised', 'al.last': 'Last seen',
    'al.state': 'State', 'al.detail': 'Detail', 'al.ack': 'Acknowledge', 'al.resolve': 'Resolve', 'al.note': 'Note (other operators see it)',
    'al.ack_title': 'Acknowledge the alarm', 'al.resolve_title': 'Resolve the alarm', 'al.acked_msg': 'Alarm acknowledged',
    'al.resolved_msg': 'Alarm resolved', 'al.by': '{who}, {when}', 'al.system': 'the system (the condition cleared)', 'al.any': 'Any',
    'al.filter': 'Filter', 'al.back': 'Back to the list', 'al.notified': 'Notified', 'al.email': 'Email', 'al.webhook': 'Webhook',
    'al.more': 'Older alarms', 'al.n_off': 'not configured', 'al.n_sent': 'sent', 'al.n_sending': 'sending',
    'al.n_not_sent': 'not sent (retrying)', 'al.n_gave_up': 'failed, gave up',
    'sev.critical': 'Critical', 'sev.warning': 'Warning', 'sev.info': 'Info', 'al.service': 'Service',
  },
});

const TABS = ['active', 'open', 'acknowledged', 'resolved'];
const SEVERITY = { critical: 'bad', warning: 'amber', info: '' };
const title = (a) => (ui.lang === 'zh' ? a.title_zh : a.title_en.charAt(0).toUpperCase() + a.title_en.slice(1));
const stateChip = (a) => h('span', { class: `chip ${a.state === 'resolved' ? 'ok' : a.state === 'open' ? 'bad' : 'amber'}` }, t(`al.${a.state}`));
const notice = (status, ms) => (status === 'sent' && ms > 0 ? `${t('al.n_sent')} ${when(ms)}` : t(`al.n_${status}`));
const detailText = (d) => Object.entries(d || {}).map(([k, v]) => `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`).join('; ');

async function change(a, what) {
  const done = await dialog({ title: t(what === 'acknowledge' ? 'al.ack_title' : 'al.resolve_title'),
    text: `${title(a)} · ${a.machine_id || t('al.service')}`, ok: t(what === 'acknowledge' ? 'al.ack' : 'al.resolve'),
    fields: [{ name: 'note', label: t('al.note'), type: 'textarea', required: true, maxlength: 500 }],
    submit: (v) => api('POST', `/api/v1/operator/alarm-cases/${a.alarm_id}/${what}`, { note: v.note }) });
  if (done) { toast(t(what === 'acknowledge' ? 'al.acked_msg' : 'al.resolved_msg')); refresh(); }
}

const actions = (a) => (!can('operator') || a.state === 'resolved' ? null : h('div', { class: 'actions' },
  a.state === 'open' ? h('button', { type: 'button', class: 'small', onclick: () => change(a, 'acknowledge') }, t('al.ack')) : null,
  h('button', { type: 'button', class: 'secondary small', onclick: () => change(a, 'resolve') }, t('al.resolve'))));

export async function render(root, parts, query) {
  if (parts[0]) return one(root, parts[0]);
  const state = TABS.includes(query.get('state')) ? query.get('state') : 'active';
  const filters = { rule: query.get('rule') || '', machine_id: query.get('machine_id') || '' };
  const data = await api('GET', `/api/v1/operator/alarm-cases${qs({ state, ...filters, limit: 200 })}`);
  const counts = data.counts || {};
  const ruleSel = h('select', { name: 'rule' }, h('option', { value: '' }, t('al.any')),
    data.rules.map((r) => h('option', { value: r.rule, selected: r.rule === filters.rule }, title(r))));
  const machine = h('input', { name: 'machine_id', value: filters.machine_id, maxlength: 64 });
  const form = h('form', { class: 'filters', id: 'alarm-filters' }, h('label', {}, t('al.rule'), ruleSel),
    h('label', {}, t('al.machine'), machine), h('button', { type: 'submit' }, t('al.filter')));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    location.hash = `#/alarms${qs({ state, rule: ruleSel.value, machine_id: machine.value.trim() })}`;
  });
  const tabs = h('nav', { class: 'tabs' }, TABS.map((s) => h('a', { href: `#/alarms${qs({ state: s, ...filters })}`, id: `tab-${s}`,
    'aria-current': s === state ? 'page' : null }, t(`al.${s}`), counts[s] !== undefined ? ` (${counts[s]})` : '')));
  let rows = data.alarms;
  let next = data.next_before_id;
  const tbl = table({ rows, rowKey: 'alarm_id', columns: [
    { key: 'severity', label: t('al.severity'), render: (a) => h('span', { class: `chip ${SEVERITY[a.severity] ?? ''}` }, t(`sev.${a.severity}`)) },
    { key: 'rule', label: t('al.rule'), render: (a) => h('a', { href: `#/alarms/${a.alarm_id}` }, title(a)) },
    { key: 'machine_id', label: t('al.machine'), wrap: true, render: (a) => (a.machine_id ? [h('a', { href: `#/machines/${encodeURIComponent(a.machine_id)}` }, a.machine_id),
      a.location ? h('div', { class: 'small muted' }, a.location) : null] : t('al.service')) },
    { key: 'detail', label: t('al.detail'), sort: false, wrap: true, render: (a) => h('span', { class: 'small' }, detailText(a.detail)) },
    { key: 'opened_ms', label: t('al.opened'), render: (a) => h('span', { class: 'nowrap', title: when(a.opened_ms) }, ago(a.opened_ms)) },
    { key: 'state', label: t('al.state'), render: stateChip },
    { key: 'actions', label: '', sort: false, render: actions },
  ] });
  const more = h('button', { type: 'button', class: 'secondary', id: 'more', hidden: !next, onclick: async () => {
    const page = await api('GET', `/api/v1/operator/alarm-cases${qs({ state, ...filters, limit: 200, before_id: next })}`);
    rows = rows.concat(page.alarms);
    next = page.next_before_id;
    more.hidden = !next;
    tbl.redraw(rows);
  } }, t('al.more'));
  clear(root, heading(t('al.title')), tabs, form, tbl, h('div', { class: 'pager' }, more));
}

async function one(root, id) {
  const a = await api('GET', `/api/v1/operator/alarm-cases/${encodeURIComponent(id)}`);
  const fact = (label, value) => [h('dt', {}, label), h('dd', {}, value ?? '–')];
  clear(root, heading(`${title(a)} · ${a.machine_id || t('al.service')}`, actions(a),
    h('a', { class: 'button secondary', href: '#/alarms' }, t('al.back'))),
  h('section', { class: 'card' }, h('dl', { class: 'facts', id: 'alarm-facts' },
    fact(t('al.state'), stateChip(a)),
    fact(t('al.severity'), t(`sev.${a.severity}`)),
    fact(t('al.machine'), a.machine_id ? [h('a', { href: `#/machines/${encodeURIComponent(a.machine_id)}` }, a.machine_id), a.location ? ` · ${a.location}` : ''] : t('al.service')),
    fact(t('al.opened'), when(a.opened_ms)),
    fact(t('al.last'), when(a.last_ms)),
    fact(t('al.detail'), detailText(a.detail)),
    a.acked_ms ? fact(t('al.acknowledged'), [t('al.by', { who: a.acked_by, when: when(a.acked_ms) }), h('br'), a.ack_note]) : null,
    a.resolved_ms ? fact(t('al.resolved'), [a.resolved_by === 'system' ? t('al.system') : t('al.by', { who: a.resolved_by, when: when(a.resolved_ms) }),
      a.resolve_note ? [h('br'), a.resolve_note] : null]) : null,
    fact(t('al.notified'), [`${t('al.email')}: ${notice(a.notifications.email, a.emailed_ms)} · ${t('al.webhook')}: ${notice(a.notifications.webhook, a.webhooked_ms)}`,
      a.notifications.error ? h('div', { class: 'small bad' }, a.notifications.error) : null]))));
}
