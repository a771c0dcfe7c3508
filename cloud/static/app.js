/* Tapshare phone pages: a small single-page app over the cloud's JSON API (/api/v1). No framework, no
   build step. Simplified Chinese first, English by the switch at the top. */
"use strict";

const T = {
  zh: {
    nav_wallet: "钱包", nav_bills: "账单", nav_points: "积分", nav_account: "我的", lang: "EN",
    dev_banner: "开发模式：短信不会真正发送（验证码显示在登录页）；支付为沙箱，不扣真实款项。",
    scan_first: "请用手机扫描饮水机屏幕上的二维码。", machine: "饮水机", price: "单价", per_l: "元/升",
    water_temp: "水温", tds: "水质 TDS", online: "在线", offline: "离线", busy: "正在为他人服务",
    ready: "可以取水", maintenance: "维护中", out_of_service: "暂停服务", step: "下一步", login_first: "用手机号登录", register_first: "实名登记",
    review_pending: "实名登记审核中", rejected: "实名登记未通过", arrears_msg: "您的账户欠费，请先充值后再取水。",
    arrears: "欠费", topup: "充值", start: "开始取水", balance: "余额", available: "可用", held: "冻结",
    scan_again: "请重新扫描饮水机上的二维码。", confirm_price: "价格已变更，请确认新价格后再开始。",
    phone: "手机号", send_code: "获取验证码", resend_in: "秒后可重发", code: "验证码", login: "登录",
    dev_sms: "开发用短信收件箱（不是真实短信）", no_sms: "还没有短信", logged_in: "已登录",
    consent_title: "个人敏感信息处理同意书", consent_agree: "我已阅读并同意", consent_decline: "不同意",
    consent_body: [
      "为落实实名制取水要求，我们需要处理您的<b>身份证件号码</b>和<b>证件照片</b>。根据《个人信息保护法》，这些属于敏感个人信息，我们在收集前单独征得您的同意。",
      "<b>目的：</b>核验您的真实身份，仅用于实名登记。",
      "<b>方式：</b>证件号码与照片加密保存，密钥与数据库分开保管；照片不公开访问，仅具有审核权限的工作人员可查看，每次查看均记录在案；证件号码在任何展示和日志中都做脱敏处理。",
      "<b>保存期限：</b>照片在审核完成后 {days} 天内删除；您可随时注销账户，注销后我们删除您的姓名、证件信息与手机号，依法保留的交易记录除外。",
      "<b>不同意的后果：</b>您将无法完成实名登记，也无法取水；不影响浏览价格和水质。"],
    reg_title: "实名登记", legal_name: "姓名（与证件一致）", doc_type: "证件类型", doc_number: "证件号码",
    doc_resident_id: "居民身份证", doc_passport: "护照", doc_hk_macau_permit: "港澳居民来往内地通行证",
    doc_taiwan_permit: "台湾居民来往大陆通行证", manual_note: "该证件类型需人工审核。",
    photo: "证件照片（JPEG 或 PNG，不超过 5 MB）", submit: "提交", id_bad: "身份证号码校验未通过，请核对。",
    verified: "已实名认证", wallet: "钱包", topup_amount: "充值金额", paying: "正在确认付款……",
    paid: "充值成功", order_closed: "订单已关闭，未扣款。", return_note: "返回本页不代表已付款：以支付平台的通知为准。",
    history: "明细", kind_topup: "充值", kind_charge: "消费", kind_refund: "退款", kind_adjustment: "调整",
    session: "取水中", waiting_valve: "正在等待饮水机开阀……", volume: "水量", cost: "金额",
    remaining: "剩余额度", flow: "流速", press_stop: "取水完毕请按饮水机上的【停止】按钮。",
    stop_phone: "在手机上停止", stopping: "已发送停止指令……",
    voided: "饮水机未确认开始：目前未扣任何费用。如果仍有出水，只按实际计量的水量计费。", ended: "取水结束", bill: "账单", bills: "历史账单",
    no_bills: "还没有账单", time: "时间", duration: "时长", avg_flow: "平均流速", amount: "金额",
    quality: "水质", points_earned: "获得积分", refunded: "已退款", location: "地点", end_reason: "结束原因",
    points: "积分", rule: "规则", gifts: "礼品", redeem: "兑换", redemptions: "兑换记录", pickup: "取货码",
    no_gifts: "暂无礼品", account: "我的账户", logout: "退出登录", delete_account: "注销账户",
    delete_confirm: "注销后将删除您的姓名、证件信息和手机号，且无法恢复。确定注销吗？",
    forfeit_confirm: "您还有余额 {amt} 元，注销后余额作废。仍要注销吗？", deleted: "账户已注销。",
    not_logged_in: "请先登录。", litre: "升", yuan: "元", min: "分钟", s: "秒", back: "返回首页",
    points_unit: "分", stock: "库存", reason_stop_button: "按下停止按钮", reason_phone_stop: "手机停止",
    reason_credit_exhausted: "额度用完", reason_max_volume: "达到单次上限", reason_idle: "长时间无水流",
    reason_max_duration: "达到最长时间", reason_cancelled: "手机或远程停止", reason_fault: "设备故障",
    reason_leak: "检测到漏水", reason_shutdown: "设备关机", reason_power_loss: "断电", ml_per_min: "毫升/分钟", registration: "实名状态",
    state_none: "未登记", state_pending: "审核中", state_verified: "已认证", state_rejected: "未通过",
  },
  en: {
    nav_wallet: "Wallet", nav_bills: "Bills", nav_points: "Points", nav_account: "Me", lang: "中文",
    dev_banner: "Development mode: no real SMS is sent (the code shows on the login page); payments are a sandbox and move no money.",
    scan_first: "Scan the QR code on a dispenser's screen with your phone.", machine: "Dispenser", price: "Price",
    per_l: "yuan/L", water_temp: "Water temperature", tds: "Water quality (TDS)", online: "Online",
    offline: "Offline", busy: "Serving someone else", ready: "Ready", maintenance: "Under maintenance",
    out_of_service: "Out of service", step: "Next step",
    login_first: "Log in with your phone number", register_first: "Register your real name",
    review_pending: "Your registration is being reviewed", rejected: "Your registration was not accepted",
    arrears_msg: "Your account is in arrears: top up before you take water.", arrears: "Arrears", topup: "Top up",
    start: "Start", balance: "Balance", available: "Available", held: "Held",
    scan_again: "Please scan the QR code on the dispenser again.",
    confirm_price: "The price has changed: confirm the new price to start.", phone: "Mobile number",
    send_code: "Send code", resend_in: "s until resend", code: "Code", login: "Log in",
    dev_sms: "Development SMS inbox (not a real SMS)", no_sms: "No messages yet", logged_in: "Logged in",
    consent_title: "Consent to process sensitive personal information", consent_agree: "I have read this and agree",
    consent_decline: "I do not agree",
    consent_body: [
      "Real-name water sales require us to process your <b>ID document number</b> and a <b>photo of the document</b>. Under China's Personal Information Protection Law these are sensitive personal information, so we ask for your separate consent before we collect them.",
      "<b>Purpose:</b> to verify your identity for registration only.",
      "<b>How:</b> the number and photo are stored encrypted with a key kept apart from the database; the photo is never publicly reachable, only staff with the reviewer role can view it, and every view is logged; the number is masked wherever it is shown or logged.",
      "<b>How long:</b> the photo is deleted {days} days after review; you can delete your account at any time, which erases your name, document and phone number (transaction records the law requires are kept).",
      "<b>If you do not agree:</b> you cannot register or buy water; you can still see prices and water quality."],
    reg_title: "Real-name registration", legal_name: "Legal name (as on the document)", doc_type: "Document type",
    doc_number: "Document number", doc_resident_id: "Resident identity card", doc_passport: "Passport",
    doc_hk_macau_permit: "Hong Kong/Macau permit", doc_taiwan_permit: "Taiwan permit",
    manual_note: "This document type is reviewed by a person.",
    photo: "Photo of the document (JPEG or PNG, at most 5 MB)", submit: "Submit",
    id_bad: "This resident ID number fails its check: please check it.", verified: "Verified",
    wallet: "Wallet", topup_amount: "Amount", paying: "Confirming the payment…", paid: "Top-up received",
    order_closed: "The order closed; nothing was charged.",
    return_note: "Coming back here does not mean you paid: the payment provider's notification decides.",
    history: "History", kind_topup: "Top-up", kind_charge: "Water", kind_refund: "Refund", kind_adjustment: "Adjustment",
    session: "Dispensing", waiting_valve: "Waiting for the dispenser to open the valve…", volume: "Volume",
    cost: "Cost", remaining: "Credit left", flow: "Flow", press_stop: "When you are done, press the STOP button on the dispenser.",
    stop_phone: "Stop from the phone", stopping: "Stop sent…",
    voided: "The dispenser did not confirm the start: nothing has been charged. If it poured anyway, you pay only for the water it measured.", ended: "Finished", bill: "Bill",
    bills: "Past bills", no_bills: "No bills yet", time: "Time", duration: "Duration", avg_flow: "Average flow",
    amount: "Amount", quality: "Water quality", points_earned: "Points earned", refunded: "Refunded",
    location: "Location", end_reason: "Ended by", points: "Points", rule: "Rule", gifts: "Gifts", redeem: "Redeem",
    redemptions: "Redemptions", pickup: "Pickup code", no_gifts: "No gifts yet", account: "My account",
    logout: "Log out", delete_account: "Delete my account",
    delete_confirm: "Deleting erases your name, document and phone number and cannot be undone. Delete?",
    forfeit_confirm: "Your balance of {amt} yuan will be lost. Delete anyway?", deleted: "Your account is deleted.",
    not_logged_in: "Please log in first.", litre: "L", yuan: "yuan", min: "min", s: "s", back: "Home",
    points_unit: "pts", stock: "In stock", reason_stop_button: "Stop button", reason_phone_stop: "Phone stop",
    reason_credit_exhausted: "Credit used up", reason_max_volume: "Volume limit", reason_idle: "No flow",
    reason_max_duration: "Time limit", reason_cancelled: "Stopped from the phone or remotely",
    reason_fault: "Machine fault", reason_leak: "Leak detected", reason_shutdown: "Machine shut down",
    reason_power_loss: "Power loss", ml_per_min: "ml/min", registration: "Registration",
    state_none: "Not registered", state_pending: "Under review", state_verified: "Verified", state_rejected: "Rejected",
  },
};
const ERR_ZH = {
  bad_phone: "手机号格式不正确（11 位，以 13-19 开头）。", sms_too_soon: "验证码发送太频繁，请稍后再试。",
  sms_limit_phone: "该号码今天获取验证码次数过多，请稍后再试。", sms_limit_ip: "当前网络请求验证码过多，请稍后再试。",
  wrong_code: "验证码错误。", code_expired: "验证码已过期，请重新获取。", too_many_attempts: "错误次数过多，请重新获取验证码。",
  no_code: "请先获取验证码。", code_used: "验证码已使用，请重新获取。", bad_name: "姓名格式不正确。",
  bad_id_number: "证件号码不正确。", not_an_image: "请上传 JPEG 或 PNG 格式的照片。", photo_too_large: "照片超过 5 MB。",
  photo_too_small: "照片太小，证件内容看不清。", photo_too_many_pixels: "照片像素过多。", body_too_large: "文件过大。",
  document_in_use: "该证件已登记在其他账户。", consent_required: "请先同意个人敏感信息处理。",
  not_registered: "请先完成实名登记。", arrears: "账户欠费，请先充值。", insufficient_balance: "余额不足，请充值。",
  machine_busy: "饮水机正在为他人服务，请稍候。", machine_offline: "饮水机离线，未扣费。", session_open: "您有正在进行的取水。",
  scan_again: "请重新扫描饮水机上的二维码。", qr_expired: "二维码已过期，请重新扫描。", price_changed: "价格已变更。",
  insufficient_points: "积分不足。", out_of_stock: "礼品已兑完。", bad_amount: "充值金额需在 1 至 500 元之间。",
  unauthenticated: "登录已过期，请重新登录。", unknown_machine: "找不到这台饮水机。", balance_remaining: "账户还有余额。",
  machine_out_of_service: "饮水机暂停服务，未扣费。", machine_maintenance: "饮水机正在维护，未扣费。",
  too_many_scans: "扫码过于频繁，请稍后再试。", upload_quota: "上传次数过多，请一小时后再试。",
  too_many_orders: "未完成的充值订单过多，请先完成或稍后再试。", busy: "服务器繁忙，请稍后再试。",
  network: "网络连接失败，请检查网络后重试。", nul_character: "输入包含无效字符。",
};

const $ = (sel) => document.querySelector(sel);
const view = () => $("#view");
let lang = localStorage.getItem("tapshare.lang") || "zh";
let timers = [];
const t = (k, vars) => {
  let s = (T[lang][k] ?? T.zh[k] ?? k);
  if (vars && typeof s === "string") for (const [a, b] of Object.entries(vars)) s = s.replace(`{${a}}`, b);
  return s;
};
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const yuan = (fen) => (fen / 100).toFixed(2);
const token = () => localStorage.getItem("tapshare.token");
const visit = () => { try { return JSON.parse(sessionStorage.getItem("tapshare.visit") || "null"); } catch { return null; } };
let devMode = false;
let clientConfig = {};

class ApiError extends Error {
  constructor(status, body) { super(body.message || `HTTP ${status}`); this.status = status; this.code = body.error; this.body = body; }
}
function errText(e) {
  if (lang === "zh" && e.code && ERR_ZH[e.code]) return ERR_ZH[e.code];
  return e.message || String(e);
}
async function api(method, path, body, extra = {}) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  let payload = body;
  if (body !== undefined && !(body instanceof Blob)) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  if (body instanceof Blob) headers["Content-Type"] = body.type || "application/octet-stream";
  let r;
  try {
    r = await fetch(path, {method, headers, body: payload, ...extra});
  } catch {
    // never "Failed to fetch": say it in words
    throw new ApiError(0, {error: "network", message: "Network error: check your connection and try again."});
  }
  const data = await r.json().catch(() => ({error: "bad_response", message: `HTTP ${r.status}`}));
  if (!r.ok) {
    if (r.status === 401 && data.error === "unauthenticated") localStorage.removeItem("tapshare.token");
    throw new ApiError(r.status, data);
  }
  return data;
}

function render(html) { view().innerHTML = html; }
function showError(where, e) { const el = typeof where === "string" ? $(where) : where; if (el) el.textContent = errText(e); }
function clearTimers() { timers.forEach(clearInterval); timers = []; }
function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }

function applyChrome() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-t]").forEach((el) => { el.textContent = t(el.dataset.t); });
  $("#lang").textContent = t("lang");
  const bar = $("#devbar");
  bar.hidden = !devMode; bar.textContent = t("dev_banner");
}

// ---------------------------------------------------------------- the QR link: /m/<machine>?c=<code>
async function scanFromUrl() {
  const m = location.pathname.match(/^\/m\/([A-Za-z0-9_-]+)$/);
  const code = new URLSearchParams(location.search).get("c");
  if (!m || !code) return null;
  try {
    const r = await api("GET", `/api/v1/scan?machine=${encodeURIComponent(m[1])}&c=${encodeURIComponent(code)}`);
    sessionStorage.setItem("tapshare.visit", JSON.stringify({presence_token: r.presence_token, machine: r.machine,
                                                             at: Date.now()}));
    history.replaceState(null, "", `/m/${m[1]}${location.hash}`);     // a reload must not reuse the code
    return null;
  } catch (e) { return e; }
}

function machineCard(m) {
  const state = !m.online ? `<span class="bad">${t("offline")}</span>` : m.state === "maintenance"
    ? `<span class="amber">${t("maintenance")}</span>` : m.state === "out_of_service"
    ? `<span class="bad">${t("out_of_service")}</span>` : m.busy ? `<span class="amber">${t("busy")}</span>`
    : `<span class="ok">${t("ready")}</span>`;
  return `<section class="card" id="machine"><h2>${t("machine")} ${esc(m.machine_id)}</h2>
    <p class="muted">${esc(m.location)}</p>
    <div class="grid">
      <div class="stat"><span>${t("price")}</span><b id="price">${yuan(m.price_fen_per_l)} ${t("per_l")}</b></div>
      <div class="stat"><span>${t("water_temp")}</span><b>${m.temp_c == null ? "—" : m.temp_c.toFixed(1) + " °C"}</b></div>
      <div class="stat"><span>${t("tds")}</span><b>${m.tds_ppm == null ? "—" : m.tds_ppm + " ppm"}</b></div>
      <div class="stat"><span>&nbsp;</span><b id="mstate">${state}</b></div>
    </div></section>`;
}

async function home(scanError) {
  const v = visit();
  let html = "";
  if (scanError) html += `<div class="card err" id="scan-error">${esc(errText(scanError))}</div>`;
  html += v ? machineCard(v.machine) : `<section class="card"><p>${t("scan_first")}</p></section>`;
  html += `<section class="card" id="next"><h2>${t("step")}</h2><div id="next-body"></div><p class="err" id="start-error"></p></section>`;
  render(html);
  const body = $("#next-body");
  if (!token()) { body.innerHTML = `<a class="button" id="go-login" href="#/login">${t("login_first")}</a>`; return; }
  let me;
  try { me = await api("GET", "/api/v1/me"); } catch (e) { showError("#start-error", e); if (!token()) home(); return; }
  if (!me.registered) {
    const st = me.identity_state;
    if (st === "pending") {
      const idv = await api("GET", "/api/v1/me/identity");
      body.innerHTML = `<p class="amber">${t("review_pending")}</p><p class="muted">${esc(idv.review_hint[lang])}</p>`;
    } else {
      body.innerHTML = (st === "rejected" ? `<p class="bad">${t("rejected")}</p>` : "") +
        `<a class="button" id="go-register" href="#/consent">${t("register_first")}</a>`;
    }
    return;
  }
  const bal = `<p>${t("balance")}: <b id="balance">¥${yuan(me.available_fen)}</b></p>`;
  if (me.arrears_fen > 0) {
    body.innerHTML = `<p class="bad" id="arrears">${t("arrears_msg")} ${t("arrears")}: ¥${yuan(me.arrears_fen)}</p>
      <a class="button" href="#/wallet">${t("topup")}</a>`;
    return;
  }
  if (!v) { body.innerHTML = bal + `<p class="muted">${t("scan_first")}</p>`; return; }
  const usable = v.machine.online && !v.machine.busy && !["maintenance", "out_of_service"].includes(v.machine.state);
  body.innerHTML = bal + `<button id="start" ${usable ? "" : "disabled"}>${t("start")} · ${yuan(v.machine.price_fen_per_l)} ${t("per_l")}</button>
    <a class="button secondary" href="#/wallet">${t("topup")}</a>`;
  $("#start").onclick = () => startSession(v);
}

async function startSession(v) {
  const btn = $("#start"); btn.disabled = true;
  try {
    const r = await api("POST", "/api/v1/sessions", {presence_token: v.presence_token,
                                                     expected_price_fen_per_l: v.machine.price_fen_per_l});
    location.hash = `#/session/${r.session_id}`;
  } catch (e) {
    btn.disabled = false;
    if (e.code === "price_changed") {
      v.machine.price_fen_per_l = e.body.price_fen_per_l;
      sessionStorage.setItem("tapshare.visit", JSON.stringify(v));
      $("#price").textContent = `${yuan(v.machine.price_fen_per_l)} ${t("per_l")}`;
      $("#start").textContent = `${t("start")} · ${yuan(v.machine.price_fen_per_l)} ${t("per_l")}`;
      $("#start-error").textContent = t("confirm_price");
      return;
    }
    showError("#start-error", e);
  }
}

// ---------------------------------------------------------------- login
async function loginView() {
  render(`<section class="card"><h1>${t("login")}</h1>
    <label for="phone">${t("phone")}</label><input id="phone" type="tel" inputmode="numeric" autocomplete="tel" maxlength="16" placeholder="13800000000">
    <button id="send" class="secondary">${t("send_code")}</button>
    <label for="code">${t("code")}</label><input id="code" inputmode="numeric" autocomplete="one-time-code" maxlength="6">
    <p class="err" id="login-error"></p><button id="login">${t("login")}</button></section>
    <section class="card" id="sms-inbox" hidden><h2>${t("dev_sms")}</h2><div id="sms-list" class="muted"></div></section>`);
  let countdown = 0;
  $("#send").onclick = async () => {
    $("#login-error").textContent = "";
    try {
      const r = await api("POST", "/api/v1/auth/sms-code", {phone: $("#phone").value});
      countdown = r.resend_after_s;
      const tick = () => { countdown -= 1; $("#send").disabled = countdown > 0;
        $("#send").textContent = countdown > 0 ? `${countdown} ${t("resend_in")}` : t("send_code"); };
      $("#send").disabled = true; timers.push(setInterval(tick, 1000));
      if (r.development_sms_sink) showDevInbox($("#phone").value);
    } catch (e) { showError("#login-error", e); }
  };
  $("#login").onclick = async () => {
    $("#login-error").textContent = "";
    try {
      const r = await api("POST", "/api/v1/auth/login", {phone: $("#phone").value, code: $("#code").value});
      localStorage.setItem("tapshare.token", r.token);
      location.hash = "#/";
    } catch (e) { showError("#login-error", e); }
  };
}
async function showDevInbox(phone) {
  const box = $("#sms-inbox"); if (!box) return;
  try {
    const r = await api("GET", `/api/v1/dev/sms?phone=${encodeURIComponent(phone)}`);
    box.hidden = false;
    $("#sms-list").innerHTML = r.messages.length ? r.messages.map((m) => `<p class="sms">${esc(m.text)}</p>`).join("") : t("no_sms");
  } catch { /* not a development server */ }
}

// ---------------------------------------------------------------- consent and registration (s4)
async function consentView() {
  if (!token()) { location.hash = "#/login"; return; }
  const idv = await api("GET", "/api/v1/me/identity");
  if (idv.consent_given) { location.hash = "#/register"; return; }
  render(`<section class="card consent"><h1>${t("consent_title")}</h1>
    ${t("consent_body").map((p) => `<p>${p.replace("{days}", String(idv.photo_retention_days))}</p>`).join("")}
    <p class="muted">v${esc(idv.consent_version)}</p><p class="err" id="consent-error"></p>
    <button id="agree">${t("consent_agree")}</button><a class="button secondary" href="#/">${t("consent_decline")}</a></section>`);
  $("#agree").onclick = async () => {
    try { await api("POST", "/api/v1/me/consent", {version: idv.consent_version, agree: true}); location.hash = "#/register"; }
    catch (e) { showError("#consent-error", e); }
  };
}

const WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
function residentIdOk(n) {       // the same GB 11643 check the server makes, to help before sending
  n = n.trim().toUpperCase();
  if (!/^\d{17}[\dX]$/.test(n)) return false;
  const sum = WEIGHTS.reduce((acc, w, i) => acc + w * Number(n[i]), 0);
  return "10X98765432"[sum % 11] === n[17];
}

async function registerView() {
  if (!token()) { location.hash = "#/login"; return; }
  const idv = await api("GET", "/api/v1/me/identity");
  if (!idv.consent_given) { location.hash = "#/consent"; return; }
  if (idv.state === "pending" || idv.state === "verified") { location.hash = "#/account"; return; }
  const docs = ["resident_id", "passport", "hk_macau_permit", "taiwan_permit"];
  render(`<section class="card"><h1>${t("reg_title")}</h1>
    ${idv.state === "rejected" ? `<p class="bad">${t("rejected")}: ${esc(idv.reject_reason)}</p>` : ""}
    <label for="name">${t("legal_name")}</label><input id="name" autocomplete="name" maxlength="40">
    <label for="doctype">${t("doc_type")}</label><select id="doctype">${docs.map((d) => `<option value="${d}">${t("doc_" + d)}</option>`).join("")}</select>
    <p class="muted" id="doc-note" hidden>${t("manual_note")}</p>
    <label for="docnum">${t("doc_number")}</label><input id="docnum" maxlength="20" autocomplete="off">
    <label for="photo">${t("photo")}</label><input id="photo" type="file" accept="image/jpeg,image/png">
    <p class="note">${esc(idv.review_hint[lang])}</p>
    <p class="err" id="reg-error"></p><button id="submit">${t("submit")}</button></section>`);
  $("#doctype").onchange = () => { $("#doc-note").hidden = $("#doctype").value === "resident_id"; };
  $("#submit").onclick = async () => {
    $("#reg-error").textContent = "";
    const docType = $("#doctype").value, number = $("#docnum").value;
    if (docType === "resident_id" && !residentIdOk(number)) { $("#reg-error").textContent = t("id_bad"); return; }
    const file = $("#photo").files[0];
    if (!file) { $("#reg-error").textContent = errText({code: "not_an_image", message: "choose a photo"}); return; }
    $("#submit").disabled = true;
    try {
      const photo = await api("PUT", "/api/v1/me/id-photo", file);
      await api("POST", "/api/v1/me/registration", {legal_name: $("#name").value, doc_type: docType,
                                                     doc_number: number, photo_id: photo.photo_id});
      location.hash = "#/";
    } catch (e) { $("#submit").disabled = false; showError("#reg-error", e); }
  };
}

// ---------------------------------------------------------------- wallet (s5)
function entriesHtml(entries) {
  return entries.map((e) => `<li><span>${t("kind_" + e.kind)}<br><small class="muted">${esc(localTime(e.created_ms))}</small></span>
    <b class="${e.amount_fen < 0 ? "" : "ok"}">${e.amount_fen < 0 ? "-" : "+"}¥${yuan(Math.abs(e.amount_fen))}</b></li>`).join("");
}
function localTime(ms) {
  return new Date(ms).toLocaleString(lang === "zh" ? "zh-CN" : "en-GB", {timeZone: clientConfig.timezone || "Asia/Shanghai", hour12: false});
}
async function walletView(params) {
  if (!token()) { location.hash = "#/login"; return; }
  const w = await api("GET", "/api/v1/me/wallet");
  const amounts = [1000, 2000, 5000, 10000];
  render(`<section class="card"><h1>${t("wallet")}</h1>
      <div class="grid"><div class="stat"><span>${t("available")}</span><b id="available">¥${yuan(w.available_fen)}</b></div>
      <div class="stat"><span>${t("held")}</span><b>¥${yuan(w.held_fen)}</b></div></div>
      ${w.arrears_fen > 0 ? `<p class="bad" id="arrears">${t("arrears")}: ¥${yuan(w.arrears_fen)}</p>` : ""}
      <div id="order-state"></div></section>
    <section class="card"><h2>${t("topup")}</h2><div class="amounts">${amounts.map((a) => `<button class="secondary amt" data-fen="${a}">¥${a / 100}</button>`).join("")}</div>
      <p class="err" id="topup-error"></p>${w.sandbox ? `<p class="muted">${t("dev_banner")}</p>` : ""}</section>
    <section class="card"><h2>${t("history")}</h2><ul class="list" id="entries">${entriesHtml(w.entries)}</ul></section>`);
  document.querySelectorAll("button.amt").forEach((b) => { b.onclick = async () => {
    try {
      const r = await api("POST", "/api/v1/me/topups", {amount_fen: Number(b.dataset.fen), return_path: "/app#/wallet?order={order_id}"});
      location.href = r.pay_url;
    } catch (e) { showError("#topup-error", e); }
  }; });
  const orderId = params.get("order");
  if (orderId) {
    const box = $("#order-state");
    every(700, async () => {
      try {
        const o = await api("GET", `/api/v1/me/topups/${encodeURIComponent(orderId)}`);
        if (o.state === "paid") { clearTimers(); box.innerHTML = `<p class="ok" id="paid">${t("paid")} ¥${yuan(o.amount_fen)}</p>`;
          const w2 = await api("GET", "/api/v1/me/wallet"); $("#available").textContent = `¥${yuan(w2.available_fen)}`;
          $("#entries").innerHTML = entriesHtml(w2.entries); }
        else if (o.state === "closed") { clearTimers(); box.innerHTML = `<p class="bad">${t("order_closed")}</p>`; }
        else box.innerHTML = `<p class="amber" id="paying">${t("paying")}</p><p class="muted">${t("return_note")}</p>`;
      } catch (e) { clearTimers(); showError(box, e); }
    });
  }
}

// ---------------------------------------------------------------- live session
function sessionView(id) {
  render(`<section class="card" id="live"><h1>${t("session")}</h1><div id="live-body"><p>${t("waiting_valve")}</p></div>
    <p class="err" id="live-error"></p></section>`);
  let stopping = false;
  every(500, async () => {
    let s;
    try { s = await api("GET", `/api/v1/sessions/${encodeURIComponent(id)}`); } catch (e) { showError("#live-error", e); return; }
    const body = $("#live-body"); if (!body) return;
    if (s.state === "voided") { clearTimers(); body.innerHTML = `<p class="big ok">¥0.00</p><p id="voided">${t("voided")}</p><a class="button" href="#/">${t("back")}</a>`; return; }
    if (s.state === "ended" && s.bill) { clearTimers(); $("#live h1").textContent = t("bill"); body.innerHTML = `<h2>${t("ended")}</h2>` + billHtml(s.bill) + `<a class="button" href="#/">${t("back")}</a>`; return; }
    if (s.state === "ended") return;       // the report is on its way
    if (s.state === "starting" || !s.progress) { body.innerHTML = `<p>${t("waiting_valve")}</p>`; return; }
    const p = s.progress, pct = Math.min(100, Math.round(100 * p.cost_fen / Math.max(1, s.credit_limit_fen)));
    body.innerHTML = `<div class="grid"><div class="stat"><span>${t("volume")}</span><b class="big" id="vol">${(p.volume_ml / 1000).toFixed(3)}</b><span>${t("litre")}</span></div>
      <div class="stat"><span>${t("cost")}</span><b class="big" id="cost">${yuan(p.cost_fen)}</b><span>${t("yuan")}</span></div>
      <div class="stat"><span>${t("flow")}</span><b>${p.flow_ml_per_min}</b><span>${t("ml_per_min")}</span></div>
      <div class="stat"><span>${t("remaining")}</span><b>¥${yuan(Math.max(0, s.credit_limit_fen - p.cost_fen))}</b></div></div>
      <div class="bar"><div id="bar-fill"></div></div>
      <p class="note" id="press-stop">${t("press_stop")}</p>
      <button class="danger" id="stop" ${stopping ? "disabled" : ""}>${stopping ? t("stopping") : t("stop_phone")}</button>`;
    $("#bar-fill").style.width = `${pct}%`;          // CSSOM, not an inline style attribute (CSP)
    $("#stop").onclick = async () => {
      stopping = true; $("#stop").disabled = true; $("#stop").textContent = t("stopping");
      try { await api("POST", `/api/v1/sessions/${encodeURIComponent(id)}/stop`); } catch (e) { showError("#live-error", e); }
    };
  });
}

// ---------------------------------------------------------------- bills (s6)
function billHtml(b) {
  const wq = b.water_quality || {};
  const mins = Math.floor(b.duration_ms / 60000), secs = Math.floor((b.duration_ms % 60000) / 1000);
  return `<div class="card bill" id="bill"><p class="big">¥${yuan(b.amount_fen)}</p><dl class="kv">
    <dt>${t("time")}</dt><dd>${esc(b.started_local)}</dd>
    <dt>${t("location")}</dt><dd>${esc(b.location || b.machine_id)}</dd>
    <dt>${t("duration")}</dt><dd>${mins ? mins + " " + t("min") + " " : ""}${secs} ${t("s")}</dd>
    <dt>${t("volume")}</dt><dd id="bill-volume">${(b.volume_ml / 1000).toFixed(3)} ${t("litre")}</dd>
    <dt>${t("avg_flow")}</dt><dd>${b.avg_flow_ml_per_min} ${t("ml_per_min")}</dd>
    <dt>${t("price")}</dt><dd>${yuan(b.price_fen_per_l)} ${t("per_l")}</dd>
    <dt>${t("water_temp")}</dt><dd>${wq.temp_start_c == null ? "—" : Number(wq.temp_start_c).toFixed(1) + " °C"}</dd>
    <dt>${t("tds")}</dt><dd>${wq.tds_measured === false || wq.tds_ppm == null ? "—" : wq.tds_ppm + " ppm"}</dd>
    <dt>${t("end_reason")}</dt><dd>${esc(t("reason_" + b.end_reason))}</dd>
    <dt>${t("points_earned")}</dt><dd>+${b.points}</dd>
    ${b.refunded_fen ? `<dt>${t("refunded")}</dt><dd class="ok">¥${yuan(b.refunded_fen)}</dd>` : ""}
  </dl><p class="muted">${esc(b.timezone)}</p></div>`;
}
async function billsView() {
  if (!token()) { location.hash = "#/login"; return; }
  const r = await api("GET", "/api/v1/me/bills");
  render(`<section class="card"><h1>${t("bills")}</h1>${r.bills.length ? `<ul class="list" id="bill-list">${r.bills.map((b) =>
    `<li><a href="#/bill/${esc(b.session_id)}"><span>${esc(b.started_local)}<br><small class="muted">${(b.volume_ml / 1000).toFixed(3)} ${t("litre")}</small></span><b>¥${yuan(b.amount_fen)}</b></a></li>`).join("")}</ul>` : `<p class="muted">${t("no_bills")}</p>`}</section>`);
}
async function billView(id) {
  const b = await api("GET", `/api/v1/me/bills/${encodeURIComponent(id)}`);
  render(`<h1>${t("bill")}</h1>${billHtml(b)}<a class="button secondary" href="#/bills">${t("bills")}</a>`);
}

// ---------------------------------------------------------------- points and gifts (s6)
async function pointsView() {
  if (!token()) { location.hash = "#/login"; return; }
  const [pts, gifts, reds] = await Promise.all([api("GET", "/api/v1/me/points"), api("GET", "/api/v1/gifts"),
                                                api("GET", "/api/v1/me/redemptions")]);
  const name = (g) => (lang === "zh" ? g.name_zh : g.name_en);
  render(`<section class="card"><h1>${t("points")}</h1><p class="big" id="points">${pts.points}</p><p class="muted">${t("rule")}: ${lang === "zh" ? "每消费 1 元得 1 积分（不足 1 元不计）" : esc(pts.rule)}</p></section>
    <section class="card"><h2>${t("gifts")}</h2><p class="err" id="redeem-error"></p>${gifts.gifts.length ? `<ul class="list">${gifts.gifts.map((g) =>
      `<li><span>${esc(name(g))}<br><small class="muted">${g.points_cost} ${t("points_unit")} · ${t("stock")} ${g.stock}</small></span><span><button class="secondary redeem" data-gift="${esc(g.gift_id)}" ${pts.points >= g.points_cost && g.stock > 0 ? "" : "disabled"}>${t("redeem")}</button></span></li>`).join("")}</ul>` : `<p class="muted">${t("no_gifts")}</p>`}</section>
    <section class="card"><h2>${t("redemptions")}</h2><ul class="list" id="redemptions">${reds.redemptions.map((r) =>
      `<li><span>${esc(name(r))}</span><span>${t("pickup")} <b>${esc(r.pickup_code)}</b></span></li>`).join("")}</ul></section>
    <section class="card"><h2>${t("history")}</h2><ul class="list">${pts.history.map((h) =>
      `<li><span>${h.kind === "earn" ? t("points_earned") : esc(h.note)}</span><b>${h.delta > 0 ? "+" : ""}${h.delta}</b></li>`).join("")}</ul></section>`);
  document.querySelectorAll("button.redeem").forEach((b) => { b.onclick = async () => {
    b.disabled = true;
    const requestId = "web-" + crypto.getRandomValues(new Uint32Array(2)).join("-");
    try { await api("POST", `/api/v1/gifts/${encodeURIComponent(b.dataset.gift)}/redeem`, {request_id: requestId}); pointsView(); }
    catch (e) { showError("#redeem-error", e); b.disabled = false; }
  }; });
}

// ---------------------------------------------------------------- account
async function accountView() {
  if (!token()) { render(`<section class="card"><p>${t("not_logged_in")}</p><a class="button" href="#/login">${t("login")}</a></section>`); return; }
  const [me, idv] = await Promise.all([api("GET", "/api/v1/me"), api("GET", "/api/v1/me/identity")]);
  render(`<section class="card"><h1>${t("account")}</h1><dl class="kv">
      <dt>${t("phone")}</dt><dd>${esc(me.phone_masked)}</dd>
      <dt>${t("registration")}</dt><dd id="id-state">${t("state_" + idv.state)}</dd>
      ${idv.number_masked ? `<dt>${t("doc_number")}</dt><dd>${esc(idv.number_masked)}</dd><dt>${t("legal_name")}</dt><dd>${esc(idv.name_masked)}</dd>` : ""}
      <dt>${t("balance")}</dt><dd>¥${yuan(me.available_fen)}</dd><dt>${t("points")}</dt><dd>${me.points}</dd></dl>
      ${idv.state === "pending" ? `<p class="note">${esc(idv.review_hint[lang])}</p>` : ""}</section>
    <section class="card"><p class="err" id="acct-error"></p><button class="secondary" id="logout">${t("logout")}</button>
      <button class="danger" id="delete">${t("delete_account")}</button></section>`);
  $("#logout").onclick = async () => { try { await api("POST", "/api/v1/auth/logout"); } catch { /* gone already */ }
    localStorage.removeItem("tapshare.token"); location.hash = "#/"; };
  $("#delete").onclick = async () => {
    if (!confirm(t("delete_confirm"))) return;
    let forfeit = false;
    if (me.available_fen > 0) { if (!confirm(t("forfeit_confirm", {amt: yuan(me.available_fen)}))) return; forfeit = true; }
    try {
      await api("DELETE", "/api/v1/me", {confirm: true, forfeit_balance: forfeit});
      localStorage.removeItem("tapshare.token");
      render(`<section class="card"><p>${t("deleted")}</p></section>`);
    } catch (e) { showError("#acct-error", e); }
  };
}

// ---------------------------------------------------------------- router
async function route(scanError) {
  clearTimers();
  applyChrome();
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  try {
    if (!parts.length) await home(scanError);
    else if (parts[0] === "login") await loginView();
    else if (parts[0] === "consent") await consentView();
    else if (parts[0] === "register") await registerView();
    else if (parts[0] === "wallet") await walletView(params);
    else if (parts[0] === "session" && parts[1]) sessionView(parts[1]);
    else if (parts[0] === "bills") await billsView();
    else if (parts[0] === "bill" && parts[1]) await billView(parts[1]);
    else if (parts[0] === "points") await pointsView();
    else if (parts[0] === "account") await accountView();
    else await home();
  } catch (e) {
    render(`<section class="card"><p class="err">${esc(errText(e))}</p><a class="button" href="#/">${t("back")}</a></section>`);
  }
}

async function boot() {
  $("#lang").onclick = () => { lang = lang === "zh" ? "en" : "zh"; localStorage.setItem("tapshare.lang", lang); route(); };
  try { clientConfig = await api("GET", "/api/v1/client-config"); devMode = clientConfig.development_sms_sink || clientConfig.sandbox_payments; }
  catch { devMode = false; }
  const scanError = await scanFromUrl();
  window.addEventListener("hashchange", () => route());
  route(scanError);
}
boot();
