// The live meters page: one EventSource on /ui/events, a snapshot a second, drawn with plain DOM and SVG.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (v) => String(v == null ? "" : v).replace(/[&<>"']/g, (c) => ESC[c]);

  // ---- numbers for people ------------------------------------------------------------------------------
  function num(n) {
    if (n == null || isNaN(n)) return "–";
    const a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "B";
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e3) return (n / 1e3).toFixed(a >= 1e4 ? 0 : 1) + "k";
    if (a >= 10 || Number.isInteger(n)) return String(Math.round(n));
    return n.toFixed(1);
  }
  function secs(s) {
    if (s == null || isNaN(s)) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + Math.round(s % 60) + "s";
    return Math.floor(m / 60) + "h " + (m % 60) + "m";
  }
  function usd(v) {
    if (v === null) return "unpriced";
    if (v == null || isNaN(v)) return "–";
    if (v === 0) return "$0";
    const a = Math.abs(v);
    if (a < 0.0001) return "<$0.0001";
    if (a < 0.01) return "$" + Number(v.toPrecision(2));
    if (a < 1) return "$" + v.toFixed(3);
    if (a < 1000) return "$" + v.toFixed(2);
    return "$" + num(v);
  }
  const pct = (v) => (v == null ? "–" : v === 0 ? "0%" : v < 0.001 ? "<0.1%" : (v * 100).toFixed(v < 0.1 ? 1 : 0) + "%");
  const clock = (ts) => new Date(ts * 1000).toLocaleTimeString([], { hour12: false });

  // ---- health ---------------------------------------------------------------------------------------------
  function health(d) {
    const until = d.until_s > 0 ? " " + secs(d.until_s) : "";
    switch (d.state) {
      case "healthy": return '<span class="pill ok">healthy</span>';
      case "half_open": return '<span class="pill warn">probing</span>';
      case "cooling_down": return '<span class="pill warn">cooling down' + esc(until) + "</span>";
      case "open": return '<span class="pill bad">circuit open' + esc(until) + "</span>";
      case "down": return '<span class="pill bad">down</span>';
      default: return '<span class="pill">' + esc(d.state) + "</span>";
    }
  }
  function statusCell(r) {
    const cls = r.status >= 200 && r.status < 300 ? "ok" : r.status === 429 || r.status === 499 ? "warn" : "bad";
    const why = r.error_class ? " " + r.error_class.replace(/_/g, " ") : "";
    return '<span class="status ' + cls + '">' + esc(r.status || "–") + esc(why) + "</span>";
  }

  // ---- charts (SVG strings; every label escaped) -----------------------------------------------------------
  function box(el) {
    return { w: Math.max(200, el.clientWidth), h: Math.max(120, el.clientHeight) };
  }
  function niceStep(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function rateChart(el, series) {
    const { w, h } = box(el);
    const L = 44, R = 8, T = 18, B = 20;
    const n = series.out.length;
    const step = niceStep(Math.max(4, ...series.out, ...series.in) / 4);
    const top = step * Math.ceil(Math.max(4, ...series.out, ...series.in) / step);
    const x = (i) => L + ((w - L - R) * i) / Math.max(1, n - 1);
    const y = (v) => T + (h - T - B) * (1 - v / top);
    let s = '<svg viewBox="0 0 ' + w + " " + h + '" role="img" aria-label="tokens per second">';
    for (let v = 0; v <= top + step / 2; v += step) {
      s += '<line class="grid" x1="' + L + '" x2="' + (w - R) + '" y1="' + y(v) + '" y2="' + y(v) + '"/>';
      s += '<text x="' + (L - 6) + '" y="' + (y(v) + 4) + '" text-anchor="end">' + num(v) + "</text>";
    }
    for (let m = 0; m <= Math.floor(n / 60); m++) {
      const i = n - 1 - m * 60;
      if (i < 0) break;
      s += '<text x="' + x(i) + '" y="' + (h - 4) + '" text-anchor="middle">' + (m ? "−" + m + "m" : "now") + "</text>";
    }
    const path = (arr) => arr.map((v, i) => (i ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1)).join("");
    s += '<path class="out-area" d="' + path(series.out) + "L" + x(n - 1) + " " + y(0) + "L" + x(0) + " " + y(0) + 'Z"/>';
    s += '<path class="out" d="' + path(series.out) + '"/><path class="in" d="' + path(series.in) + '"/>';
    s += '<text x="' + (w - R) + '" y="10" text-anchor="end" class="legend-t">— out   - - in</text>';
    el.innerHTML = s + "</svg>";
  }
  function barChart(el, labels, values, fmt, empty) {
    const { w, h } = box(el);
    if (!values.some((v) => v > 0)) {
      el.innerHTML = '<svg viewBox="0 0 ' + w + " " + h + '"><text class="none" x="' + w / 2 + '" y="' + h / 2 + '" text-anchor="middle">' + esc(empty) + "</text></svg>";
      return;
    }
    const T = 16, B = 34, L = 4, R = 4;
    const top = Math.max(...values);
    const bw = (w - L - R) / values.length;
    let s = '<svg viewBox="0 0 ' + w + " " + h + '" role="img">';
    values.forEach((v, i) => {
      const bh = ((h - T - B) * v) / top;
      const bx = L + i * bw + bw * 0.12;
      s += '<rect class="bar" rx="2" x="' + bx + '" y="' + (h - B - bh) + '" width="' + bw * 0.76 + '" height="' + bh + '"/>';
      if (v > 0) s += '<text class="label" x="' + (bx + bw * 0.38) + '" y="' + (h - B - bh - 4) + '" text-anchor="middle">' + esc(fmt(v)) + "</text>";
      s += '<text x="' + (bx + bw * 0.38) + '" y="' + (h - B + 14) + '" text-anchor="middle">' + esc(labels[i]) + "</text>";
    });
    el.innerHTML = s + "</svg>";
  }
  function hbarChart(el, rows, empty) {
    const { w, h } = box(el);
    rows = rows.filter((r) => r.cost_usd > 0).slice(0, 6);
    if (!rows.length) {
      el.innerHTML = '<svg viewBox="0 0 ' + w + " " + h + '"><text class="none" x="' + w / 2 + '" y="' + h / 2 + '" text-anchor="middle">' + esc(empty) + "</text></svg>";
      return;
    }
    const top = Math.max(...rows.map((r) => r.cost_usd));
    const row = Math.min(30, h / rows.length), lw = Math.min(130, w * 0.38), vw = 64;
    let s = '<svg viewBox="0 0 ' + w + " " + h + '" role="img">';
    rows.forEach((r, i) => {
      const yy = i * row + 4, bw = Math.max(2, ((w - lw - vw) * r.cost_usd) / top);
      const name = r.name.length > 18 ? r.name.slice(0, 17) + "…" : r.name;
      s += '<text class="label" x="0" y="' + (yy + row / 2 + 2) + '">' + esc(name || "(none)") + "</text>";
      s += '<rect class="bar2" rx="2" x="' + lw + '" y="' + (yy + 3) + '" width="' + bw + '" height="' + (row - 10) + '"/>';
      s += '<text x="' + (lw + bw + 6) + '" y="' + (yy + row / 2 + 2) + '">' + esc(usd(r.cost_usd)) + "</text>";
    });
    el.innerHTML = s + "</svg>";
  }

  // ---- tables ----------------------------------------------------------------------------------------------
  const td = (v, n) => (n ? '<td class="n">' : "<td>") + v + "</td>";
  function setRows(table, html, cols, empty) {
    table.tBodies[0].innerHTML = html || '<tr><td class="empty-row" colspan="' + cols + '">' + esc(empty) + "</td></tr>";
  }
  function routesTable(routes) {
    let html = "";
    const shown = routes.filter((r) => !r.route.startsWith("mock") || r.deployments.some((d) => d.requests > 0));
    for (const r of shown.length ? shown : routes) {
      const reqs = r.deployments.reduce((a, d) => a + (d.requests || 0), 0);
      html += '<tr class="route">' + td(esc(r.route) + ' <span class="muted">' + esc(r.strategy) + "</span>") + td("") +
        td(num(r.outstanding), 1) + td("", 1) + td("", 1) + td("", 1) + td("", 1) + td(num(reqs), 1) + "</tr>";
      for (const d of r.deployments) {
        html += '<tr class="dep">' + td(esc(d.name) + ' <span class="muted">' + esc(d.model) + "</span>") + td(health(d)) +
          td(num(d.outstanding), 1) + td(secs(d.ttft_p50_s), 1) + td(secs(d.ttft_p99_s), 1) +
          td(d.tokens_per_s == null ? "–" : num(d.tokens_per_s), 1) + td(pct(d.error_rate), 1) + td(num(d.requests), 1) + "</tr>";
      }
    }
    setRows($("t-routes"), html, 8, "no routes configured");
  }
  function costTable(id, rows, what) {
    const html = (rows || []).slice(0, 12).map((r) =>
      "<tr>" + td(r.name ? esc(r.name) : '<span class="muted">(' + what + ")</span>") + td(num(r.requests), 1) +
      td(num(r.input), 1) + td(num(r.output), 1) + td(esc(usd(r.cost_usd)), 1) + "</tr>").join("");
    setRows($(id), html, 5, "nothing today yet");
  }
  let lastSeq = 0;
  function recentTable(recent) {
    const html = recent.map((r) => {
      const who = [r.run, r.key].filter(Boolean).map(esc).join(" · ");
      return '<tr data-seq="' + r.seq + '"' + (lastSeq && r.seq > lastSeq ? ' class="fresh"' : "") + ">" + td(clock(r.ts + r.duration_s)) +
        td(esc(r.route) + (r.deployment ? ' <span class="muted">→ ' + esc(r.deployment) + "</span>" : "")) +
        td(statusCell(r)) + td(num(r.input), 1) + td(num(r.output), 1) + td(secs(r.ttft_s), 1) +
        td(secs(r.duration_s), 1) + td(esc(usd(r.cost_usd)), 1) + td(who || '<span class="muted">–</span>') + "</tr>";
    }).join("");
    setRows($("t-recent"), html, 9, "no requests yet");
    if (recent.length) lastSeq = recent[0].seq;
  }

  // ---- the page --------------------------------------------------------------------------------------------
  const base = location.origin + "/v1";
  function emptyState(snap) {
    const none = snap.totals.requests === 0;
    $("empty").hidden = !none;
    if (!none) return;
    const names = snap.routes.map((r) => r.route);
    const model = names.find((n) => !n.startsWith("mock")) || names[0] || "mock";
    $("base-url").textContent = base;
    $("route-names").textContent = names.join(", ") || "(none)";
    $("snippet").textContent =
      "from openai import OpenAI\n" +
      'client = OpenAI(base_url="' + base + '", api_key="your-key")\n' +
      'print(client.chat.completions.create(model="' + model + '", messages=[{"role": "user", "content": "hi"}]))';
  }
  function render(snap) {
    const t = snap.totals, c = snap.cost_today;
    $("k-out").textContent = num(snap.rate.out);
    $("k-out-n").textContent = num(t.output) + " tokens out since start";
    $("k-in").textContent = num(snap.rate.in);
    $("k-in-n").textContent = num(t.input) + " tokens in since start";
    $("k-flight").textContent = num(snap.in_flight);
    const queued = snap.routes.reduce((a, r) => a + r.outstanding, 0);
    $("k-flight-n").textContent = num(queued) + " at upstreams";
    $("k-req").textContent = num(t.requests);
    $("k-req-n").textContent = t.errors ? num(t.errors) + " errors (" + pct(t.errors / t.requests) + ")" : "no errors";
    $("k-cost").textContent = c ? usd(c.cost_usd) : usd(t.cost_usd);
    $("k-cost-n").textContent = c ? num(c.requests) + " requests today" : "since start";
    const workers = snap.workers > 1 ? " · " + snap.workers + " workers" : "";
    $("meta").textContent = "v" + snap.version + " · up " + secs(snap.uptime_s) + workers + " · " + base;
    emptyState(snap);
    rateChart($("c-rate"), snap.series);
    const b = snap.ttft_hist.bounds_ms;
    const labels = b.map((v, i) => (v >= 1000 ? v / 1000 + "s" : i ? String(v) : v + "ms")).concat(["more"]);
    barChart($("c-ttft"), labels, snap.ttft_hist.counts, num, "no streamed tokens yet");
    hbarChart($("c-cost"), c ? c.by_route : [], "no priced requests today");
    routesTable(snap.routes);
    costTable("t-keys", c && c.by_key, "no key");
    costTable("t-runs", c && c.by_run, "no run");
    recentTable(snap.recent);
  }

  // The admin key, when the daemon asks for one: from ?key= (the server also sets a cookie), then off the URL.
  const params = new URLSearchParams(location.search);
  const key = params.get("key");
  if (key) history.replaceState(null, "", location.pathname);
  const conn = $("conn");
  let latest = null;
  const source = new EventSource("/ui/events" + (key ? "?key=" + encodeURIComponent(key) : ""));
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
  source.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "conn down"; };
  source.onmessage = (ev) => {
    latest = JSON.parse(ev.data);
    conn.textContent = "live"; conn.className = "conn live";
    render(latest);
  };
  window.addEventListener("resize", () => latest && render(latest));
})();
