// The console's frame: signing in, the menu (only what the operator's role may use), the language, and the
// router (#/fleet, #/machines/S1, ...), which loads each page's module from ./pages/ on first use.
import { state, t, addStrings, api, h, clear, can, toast, ApiError } from './lib.js';

// [route, module, at least this role, or exactly one of these roles, menu label (none: not in the menu)]
const ROUTES = [
  { path: 'fleet', module: 'fleet', role: 'viewer', label: 'nav.fleet' },
  { path: 'machines', module: 'machine', role: 'viewer' },
  { path: 'sessions', module: 'sessions', role: 'viewer', label: 'nav.sessions' },
  { path: 'alarms', module: 'alarms', role: 'viewer', label: 'nav.alarms' },
  { path: 'identity', module: 'identity', role: 'reviewer', label: 'nav.identity' },
  { path: 'users', module: 'users', role: 'viewer', label: 'nav.users' },
  { path: 'gifts', module: 'gifts', role: 'viewer', label: 'nav.gifts' },
  { path: 'reports', module: 'reports', role: 'viewer', label: 'nav.reports' },
  { path: 'releases', module: 'releases', role: 'viewer', label: 'nav.releases' },
  { path: 'audit', module: 'audit', role: 'admin', label: 'nav.audit' },
  { path: 'operators', module: 'operators', role: 'admin', label: 'nav.operators' },
  { path: 'account', module: 'account', role: 'viewer', label: 'nav.account' },
];

addStrings({
  zh: {
    title: '运营控制台', 'nav.fleet': '设备', 'nav.sessions': '用水记录', 'nav.alarms': '告警', 'nav.identity': '实名审核',
    'nav.users': '用户', 'nav.gifts': '礼品', 'nav.reports': '报表', 'nav.releases': '软件升级', 'nav.audit': '审计日志', 'nav.operators': '操作员',
    'nav.account': '我的账户', signout: '退出', lang: 'English',
    'signin.title': 'Tapshare 运营控制台', 'signin.name': '用户名', 'signin.password': '密码', 'signin.totp': '动态验证码（6 位）',
    'signin.go': '登录', 'signin.bad': '用户名或密码错误', 'signin.locked': '登录失败次数过多，账户已锁定，请 {min} 分钟后再试',
    'signin.totp_needed': '请输入身份验证器中的 6 位验证码', 'signin.bad_totp': '验证码错误或已使用',
    'signin.disabled': '此操作员已被管理员停用', 'signin.ended': '登录已过期，请重新登录', 'signin.many': '尝试次数过多，请稍后再试',
    'page.missing': '没有这个页面', 'page.forbidden': '您的角色无权查看此页面', 'page.failed': '加载失败：{msg}',
    'role.viewer': '查看员', 'role.operator': '运营员', 'role.reviewer': '审核员', 'role.admin': '管理员',
    devbar: '开发模式：{what}。不要用于真实顾客。',
  },
  en: {
    title: 'Operators\u2019 console', 'nav.fleet': 'Machines', 'nav.sessions': 'Rental records', 'nav.alarms': 'Alarms',
    'nav.identity': 'ID review', 'nav.users': 'Users', 'nav.gifts': 'Gifts', 'nav.reports': 'Reports', 'nav.releases': 'Software updates', 'nav.audit': 'Audit log',
    'nav.operators': 'Operators', 'nav.account': 'My account', signout: 'Sign out', lang: '中文',
    'signin.title': 'Tapshare operators\u2019 console', 'signin.name': 'Name', 'signin.password': 'Password',
    'signin.totp': 'Authenticator code (6 digits)', 'signin.go': 'Sign in', 'signin.bad': 'Wrong name or password',
    'signin.locked': 'Too many failed sign-ins: the account is locked; try again in {min} min',
    'signin.totp_needed': 'Enter the 6-digit code from your authenticator app', 'signin.bad_totp': 'Wrong or already used code',
    'signin.disabled': 'This operator has been disabled by an admin', 'signin.ended': 'Your session ended: sign in again',
    'signin.many': 'Too many attempts: try again later',
    'page.missing': 'No such page', 'page.forbidden': 'Your role may not see this page', 'page.failed': 'Could not load: {msg}',
    'role.viewer': 'Viewer', 'role.operator': 'Operator', 'role.reviewer': 'Reviewer', 'role.admin': 'Admin',
    devbar: 'Development mode: {what}. Never use it for real customers.',
  },
});

state.lang = localStorage.getItem('console.lang') || (navigator.language.startsWith('zh') ? 'zh' : 'en');
const modules = {};
let development = [];          // the development providers the cloud runs with, named in a banner
let renderSeq = 0;

function allowed(route) { return route.only ? can(null, route.only) : can(route.role); }

function drawFrame() {
  document.documentElement.lang = state.lang === 'zh' ? 'zh-CN' : 'en';
  document.title = `Tapshare ${t('title')}`;
  const current = location.hash.replace(/^#\/?/, '').split(/[/?]/)[0] || 'fleet';
  clear(document.getElementById('nav'), h('div', { class: 'brand' }, 'Tapshare'),
    ROUTES.filter((r) => r.label && allowed(r)).map((r) => h('a', {
      href: `#/${r.path}`, id: `nav-${r.path}`, 'aria-current': r.path === current || (current === 'machines' && r.path === 'fleet') ? 'page' : null,
    }, t(r.label))));
  api('GET', '/api/v1/operator/alarm-cases?state=active&limit=1').then((d) => {     // how many need looking at
    const link = document.getElementById('nav-alarms');
    if (link && d.counts.active) link.append(h('span', { class: 'count', title: t('nav.alarms') }, String(d.counts.active)));
  }).catch(() => {});
  const me = state.me;
  document.getElementById('who').textContent = me ? `${me.display_name || me.operator_id} · ${t(`role.${me.role}`)}` : '';
  document.getElementById('lang').textContent = t('lang');
  document.getElementById('signout').textContent = t('signout');
  const bar = document.getElementById('devbar');
  bar.textContent = development.length ? t('devbar', { what: development.join('; ') }) : '';
  bar.hidden = !development.length;
}

async function route() {
  if (!state.me) return;
  const seq = ++renderSeq;
  drawFrame();
  const [pathPart, query = ''] = location.hash.replace(/^#\/?/, '').split('?');
  const parts = pathPart.split('/').filter(Boolean).map(decodeURIComponent);
  const r = ROUTES.find((x) => x.path === (parts[0] || 'fleet'));
  const view = document.getElementById('view');
  const crumb = document.getElementById('crumb');
  crumb.textContent = '';
  if (!r) { clear(view, h('p', { class: 'card' }, t('page.missing'))); return; }
  if (!allowed(r)) { clear(view, h('p', { class: 'card bad' }, t('page.forbidden'))); return; }
  try {
    modules[r.module] ||= await import(`./pages/${r.module}.js`);
    if (seq !== renderSeq) return;
    const root = h('div', { class: 'page', id: `page-${r.module}` });
    clear(view, root);
    crumb.textContent = t(r.label || 'nav.fleet');
    await modules[r.module].render(root, parts.slice(1), new URLSearchParams(query), { crumb });
  } catch (e) {
    if (seq !== renderSeq || (e instanceof ApiError && e.status === 401)) return;
    clear(view, h('p', { class: 'card bad', role: 'alert' }, t('page.failed', { msg: e.message || String(e) })));
  }
}

function showSignin(reason) {
  state.me = null;
  document.getElementById('shell').hidden = true;
  const box = document.getElementById('signin');
  box.hidden = false;
  document.documentElement.lang = state.lang === 'zh' ? 'zh-CN' : 'en';
  const err = h('p', { class: 'field-error', role: 'alert', id: 'signin-error' }, reason || '');
  const name = h('input', { name: 'name', id: 'signin-name', autocomplete: 'username', required: true, maxlength: 64 });
  const password = h('input', { name: 'password', id: 'signin-password', type: 'password', autocomplete: 'current-password', required: true, maxlength: 200 });
  const totp = h('input', { name: 'totp', id: 'signin-totp', inputmode: 'numeric', autocomplete: 'one-time-code', maxlength: 6, pattern: '[0-9]{6}' });
  const totpLabel = h('label', { hidden: true }, t('signin.totp'), totp);
  const form = h('form', {}, h('h1', {}, t('signin.title')),
    h('label', {}, t('signin.name'), name), h('label', {}, t('signin.password'), password), totpLabel, err,
    h('button', { type: 'submit', id: 'signin-go' }, t('signin.go')),
    h('button', { type: 'button', class: 'quiet', onclick: () => { setLang(state.lang === 'zh' ? 'en' : 'zh'); showSignin(); } }, t('lang')));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    err.textContent = '';
    try {
      const me = await api('POST', '/api/v1/console/login', { name: name.value.trim(), password: password.value, totp: totp.value.trim() });
      password.value = '';
      signedIn(me);
    } catch (x) {
      const messages = { bad_credentials: t('signin.bad'), totp_required: t('signin.totp_needed'), bad_totp: t('signin.bad_totp'),
        operator_disabled: t('signin.disabled'), too_many_logins: t('signin.many'),
        account_locked: t('signin.locked', { min: Math.ceil((x.body?.retry_after_s || 900) / 60) }) };
      err.textContent = messages[x.code] || x.message;
      if (x.code === 'totp_required' || x.code === 'bad_totp') { totpLabel.hidden = false; totp.value = ''; totp.focus(); }
    }
  });
  clear(box, form);
  name.focus();
}

function signedIn(me) {
  state.me = me.operator;
  state.csrf = me.csrf_token;
  document.getElementById('signin').hidden = true;
  document.getElementById('shell').hidden = false;
  if (!location.hash || location.hash === '#/') location.hash = '#/fleet';
  route();
}

function setLang(lang) {
  state.lang = lang;
  localStorage.setItem('console.lang', lang);
}

const signedOut = (body) => showSignin(body?.error === 'operator_disabled' ? t('signin.disabled') : t('signin.ended'));
/** The page re-renders itself (after a change), keeping the scroll position. */
export function refresh() { const y = window.scrollY; route().then(() => window.scrollTo(0, y)); }

document.getElementById('lang').addEventListener('click', () => { setLang(state.lang === 'zh' ? 'en' : 'zh'); route(); });
document.getElementById('signout').addEventListener('click', async () => {
  try {
    await api('POST', '/api/v1/console/logout');
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) { toast(e.message, true); return; }   // not signed out: say so
  }
  showSignin();
});
window.addEventListener('hashchange', route);

(async () => {
  try {
    const health = await fetch('/healthz').then((r) => r.json());
    development = health.development_providers || [];
  } catch (e) { /* the page works without it */ }
  try {
    signedIn(await api('GET', '/api/v1/console/me'));
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) toast(e.message, true);
    showSignin();
  }
  state.onSignedOut = signedOut;      // from now on a 401 means the session ended under the operator
})();
