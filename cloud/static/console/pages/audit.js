// The audit log (admins): who did what to what, when; filtered by operator, action, target and days; paged
// backwards; the same search as CSV.
import { t, addStrings, api, h, clear, table, heading, when, qs, csvLink, dayStartMs } from '../lib.js';

addStrings({
  zh: {
    'aud.title': '审计日志', 'aud.when': '时间', 'aud.who': '操作员', 'aud.action': '操作', 'aud.target': '对象',
    'aud.detail': '详情', 'aud.from': '从', 'aud.to': '到（含）', 'aud.any': '全部', 'aud.search': '查询', 'aud.more': '更早的记录',
  },
  en: {
    'aud.title': 'Audit log', 'aud.when': 'When', 'aud.who': 'Operator', 'aud.action': 'Action', 'aud.target': 'Target',
    'aud.detail': 'Detail', 'aud.from': 'From', 'aud.to': 'To (incl.)', 'aud.any': 'Any', 'aud.search': 'Search', 'aud.more': 'Older entries',
  },
});

const DAY_MS = 86400000;

export async function render(root, parts, query) {
  const f = { operator_id: query.get('operator_id') || '', action: query.get('action') || '', target: query.get('target') || '',
    from: query.get('from') || '', to: query.get('to') || '' };
  const params = { operator_id: f.operator_id, action: f.action, target: f.target,
    from_ms: f.from ? dayStartMs(f.from) : '', to_ms: f.to ? dayStartMs(f.to) + DAY_MS : '' };
  const first = await api('GET', `/api/v1/operator/audit${qs({ ...params, limit: 100 })}`);
  let rows = first.entries;
  const inputs = {
    operator_id: h('input', { name: 'operator_id', value: f.operator_id, maxlength: 64 }),
    action: h('select', { name: 'action' }, h('option', { value: '' }, t('aud.any')),
      first.actions.map((a) => h('option', { value: a, selected: a === f.action }, a))),
    target: h('input', { name: 'target', value: f.target, maxlength: 128 }),
    from: h('input', { name: 'from', type: 'date', value: f.from }),
    to: h('input', { name: 'to', type: 'date', value: f.to }),
  };
  const form = h('form', { class: 'filters', id: 'audit-filters' },
    h('label', {}, t('aud.who'), inputs.operator_id), h('label', {}, t('aud.action'), inputs.action),
    h('label', {}, t('aud.target'), inputs.target), h('label', {}, t('aud.from'), inputs.from), h('label', {}, t('aud.to'), inputs.to),
    h('button', { type: 'submit' }, t('aud.search')));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const v = Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value.trim()]));
    location.hash = `#/audit${qs(v)}`;
  });
  const tbl = table({ rows, rowKey: 'id', columns: [
    { key: 'at_ms', label: t('aud.when'), render: (e) => h('span', { class: 'nowrap' }, when(e.at_ms)) },
    { key: 'operator_id', label: t('aud.who'), wrap: true },
    { key: 'action', label: t('aud.action'), render: (e) => h('span', { class: 'mono' }, e.action) },
    { key: 'target', label: t('aud.target'), wrap: true },
    { key: 'detail', label: t('aud.detail'), sort: false, wrap: true, render: (e) => h('span', { class: 'mono small' },
      Object.keys(e.detail || {}).length ? JSON.stringify(e.detail) : '') },
  ] });
  let next = first.next_before_id;
  const more = h('button', { type: 'button', class: 'secondary', id: 'more', hidden: !next, onclick: async () => {
    const page = await api('GET', `/api/v1/operator/audit${qs({ ...params, before_id: next, limit: 100 })}`);
    rows = rows.concat(page.entries);
    next = page.next_before_id;
    more.hidden = !next;
    tbl.redraw(rows);
  } }, t('aud.more'));
  clear(root, heading(t('aud.title'), csvLink('/api/v1/operator/audit', params)), form, tbl, h('div', { class: 'pager' }, more));
}
