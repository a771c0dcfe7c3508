// Gifts: the catalogue with its stock (operators add, edit, restock, take off the shelf), and the redemptions with
// their pickup codes, marked picked up when the gift is handed over (once; the server refuses a second time).
import { state, t, addStrings, api, h, clear, table, dialog, toast, heading, when, can, qs } from '../lib.js';
import { refresh } from '../app.js';

addStrings({
  zh: {
    'gift.title': '礼品', 'gift.catalog': '礼品目录', 'gift.redemptions': '兑换记录', 'gift.new': '新增礼品',
    'gift.name_zh': '中文名称', 'gift.name_en': '英文名称', 'gift.cost': '所需积分', 'gift.stock': '库存', 'gift.active': '状态',
    'gift.on': '上架中', 'gift.off': '已下架', 'gift.edit': '修改', 'gift.restock': '补货', 'gift.add': '增加数量（负数为报损）',
    'gift.take_off': '下架', 'gift.put_on': '上架', 'gift.saved': '已保存', 'gift.low': '库存不足',
    'gift.code': '取货码', 'gift.find': '查找', 'gift.user': '用户', 'gift.gift': '礼品', 'gift.points': '积分',
    'gift.when': '兑换时间', 'gift.picked': '领取', 'gift.waiting': '待领取', 'gift.picked_up': '已领取', 'gift.all': '全部',
    'gift.mark': '标记为已领取', 'gift.marked': '已标记为已领取：{code}', 'gift.by': '{who} 于 {when}',
    'gift.actions': '操作', 'gift.code_hint': '输入顾客出示的 8 位取货码',
  },
  en: {
    'gift.title': 'Gifts', 'gift.catalog': 'Catalogue', 'gift.redemptions': 'Redemptions', 'gift.new': 'New gift',
    'gift.name_zh': 'Chinese name', 'gift.name_en': 'English name', 'gift.cost': 'Points', 'gift.stock': 'Stock', 'gift.active': 'State',
    'gift.on': 'On offer', 'gift.off': 'Withdrawn', 'gift.edit': 'Edit', 'gift.restock': 'Restock', 'gift.add': 'Add (negative: write off)',
    'gift.take_off': 'Withdraw', 'gift.put_on': 'Offer', 'gift.saved': 'Saved', 'gift.low': 'Low stock',
    'gift.code': 'Pickup code', 'gift.find': 'Find', 'gift.user': 'User', 'gift.gift': 'Gift', 'gift.points': 'Points',
    'gift.when': 'Redeemed', 'gift.picked': 'Handed over', 'gift.waiting': 'Waiting', 'gift.picked_up': 'Picked up', 'gift.all': 'All',
    'gift.mark': 'Mark picked up', 'gift.marked': 'Marked picked up: {code}', 'gift.by': '{who} at {when}',
    'gift.actions': 'Actions', 'gift.code_hint': 'The 8-digit code the customer shows',
  },
});

const patch = (id, body) => api('PATCH', `/api/v1/operator/gifts/${encodeURIComponent(id)}`, body);

export async function render(root, parts, query) {
  const tab = query.get('tab') === 'redemptions' ? 'redemptions' : 'catalog';
  const tabs = h('nav', { class: 'tabs' }, ['catalog', 'redemptions'].map((x) => h('a', {
    href: `#/gifts?tab=${x}`, id: `tab-${x}`, 'aria-current': x === tab ? 'page' : null }, t(`gift.${x}`))));
  if (tab === 'redemptions') return redemptions(root, tabs, query);
  const { gifts } = await api('GET', '/api/v1/operator/gifts');
  const mayEdit = can('operator');
  const editFields = (g = {}) => [
    { name: 'name_zh', label: t('gift.name_zh'), value: g.name_zh, required: true, maxlength: 100 },
    { name: 'name_en', label: t('gift.name_en'), value: g.name_en, required: true, maxlength: 100 },
    { name: 'points_cost', label: t('gift.cost'), type: 'number', value: g.points_cost, required: true, min: 1, max: 1000000 }];
  const actions = (g) => h('div', { class: 'actions' },
    h('button', { type: 'button', class: 'secondary small', onclick: async () => {
      if (await dialog({ title: `${t('gift.edit')}`, fields: editFields(g), submit: (v) => patch(g.gift_id, v) })) refresh();
    } }, t('gift.edit')),
    h('button', { type: 'button', class: 'secondary small', onclick: async () => {
      if (await dialog({ title: `${t('gift.restock')} · ${state.lang === 'zh' ? g.name_zh : g.name_en}`,
        fields: [{ name: 'stock_add', label: t('gift.add'), type: 'number', required: true, min: -1000000, max: 1000000 }],
        submit: (v) => patch(g.gift_id, v) })) refresh();
    } }, t('gift.restock')),
    h('button', { type: 'button', class: 'secondary small', onclick: async () => {
      try { await patch(g.gift_id, { active: !g.active }); toast(t('gift.saved')); refresh(); } catch (e) { toast(e.message, true); }
    } }, g.active ? t('gift.take_off') : t('gift.put_on')));
  clear(root, heading(t('gift.title'), mayEdit ? h('button', { type: 'button', id: 'new-gift', onclick: async () => {
    if (await dialog({ title: t('gift.new'), fields: [...editFields(), { name: 'stock', label: t('gift.stock'), type: 'number', required: true, min: 0, max: 1000000, value: 0 }],
      submit: (v) => api('POST', '/api/v1/operator/gifts', v) })) refresh();
  } }, t('gift.new')) : null), tabs, table({
    rows: gifts, rowKey: 'gift_id', sortKey: 'points_cost', columns: [
      { key: 'name_zh', label: t('gift.name_zh'), wrap: true },
      { key: 'name_en', label: t('gift.name_en'), wrap: true },
      { key: 'points_cost', label: t('gift.cost'), num: true },
      { key: 'stock', label: t('gift.stock'), num: true, render: (g) => h('span', { class: g.stock < 5 ? 'bad' : '' }, String(g.stock), g.stock < 5 ? ` · ${t('gift.low')}` : '') },
      { key: 'active', label: t('gift.active'), render: (g) => h('span', { class: `chip ${g.active ? 'ok' : ''}` }, g.active ? t('gift.on') : t('gift.off')) },
      mayEdit ? { key: 'actions', label: t('gift.actions'), sort: false, render: actions } : null,
    ].filter(Boolean) }));
}

async function redemptions(root, tabs, query) {
  const show = ['waiting', 'picked_up', 'all'].includes(query.get('state')) ? query.get('state') : 'waiting';
  const code = (query.get('code') || '').replace(/\D/g, '').slice(0, 16);
  const { redemptions: rows } = await api('GET', `/api/v1/operator/redemptions${qs({ state: code ? 'all' : show, code, limit: 200 })}`);
  const codeInput = h('input', { id: 'code', inputmode: 'numeric', maxlength: 16, value: code, placeholder: t('gift.code_hint'), 'aria-label': t('gift.code') });
  const form = h('form', { class: 'filters' }, h('label', {}, t('gift.code'), codeInput),
    h('label', {}, t('gift.picked'), h('select', { id: 'state', onchange: (e) => { location.hash = `#/gifts?tab=redemptions&state=${e.target.value}`; } },
      ['waiting', 'picked_up', 'all'].map((s) => h('option', { value: s, selected: s === show }, t(`gift.${s}`))))),
    h('button', { type: 'submit', id: 'find' }, t('gift.find')));
  form.addEventListener('submit', (e) => { e.preventDefault(); location.hash = `#/gifts?tab=redemptions&code=${encodeURIComponent(codeInput.value.trim())}`; });
  const mark = async (r) => {
    try {
      await api('POST', `/api/v1/operator/redemptions/${encodeURIComponent(r.redemption_id)}/picked-up`);
      toast(t('gift.marked', { code: r.pickup_code }));
      refresh();
    } catch (e) { toast(e.message, true); }
  };
  clear(root, heading(t('gift.title')), tabs, form, table({
    rows, rowKey: 'redemption_id', columns: [
      { key: 'pickup_code', label: t('gift.code'), render: (r) => h('span', { class: 'mono' }, r.pickup_code) },
      { key: 'name_zh', label: t('gift.gift'), wrap: true, render: (r) => (state.lang === 'zh' ? r.name_zh : r.name_en) },
      { key: 'phone_masked', label: t('gift.user'), render: (r) => h('a', { href: `#/users/${encodeURIComponent(r.user_id)}` }, r.phone_masked || r.user_id) },
      { key: 'points', label: t('gift.points'), num: true },
      { key: 'created_ms', label: t('gift.when'), render: (r) => when(r.created_ms) },
      { key: 'picked_up_ms', label: t('gift.picked'), render: (r) => (r.picked_up_ms
        ? h('span', { class: 'chip ok', title: t('gift.by', { who: r.picked_up_by, when: when(r.picked_up_ms) }) }, t('gift.picked_up'))
        : can('operator') ? h('button', { type: 'button', class: 'small', onclick: () => mark(r) }, t('gift.mark')) : h('span', { class: 'chip amber' }, t('gift.waiting'))) },
    ] }));
}
