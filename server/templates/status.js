/* Refresh without reload: poll the JSON API, update the fields in place; when nodes,
   problems or events appear or go, swap <main> for a freshly rendered one. */
(function () {
  "use strict";
  var PERIOD = {{ m.refresh_ms }};
  var live = document.getElementById("live");
  function all(root, sel) { return Array.prototype.slice.call(root.querySelectorAll(sel)); }
  function setText(el, value) {
    var text = value === null || value === undefined || value === "" ? "-" : String(value);
    if (el.textContent !== text) { el.textContent = text; }
  }
  function fill(root, node) {
    root.classList.toggle("revoked", node.state !== "enrolled");
    all(root, "[data-k]").forEach(function (el) {
      if (Object.prototype.hasOwnProperty.call(node, el.dataset.k)) { setText(el, node[el.dataset.k]); }
    });
    all(root, "[data-css]").forEach(function (el) {
      var base = el.classList.contains("pill") ? "pill " : (el.classList.contains("state") ? "state " : "");
      el.className = base + node[el.dataset.css];
    });
  }
  function structure(m, main) {
    var shown = all(main, "[data-node]").map(function (r) { return r.dataset.node; }).join(",");
    var problems = all(main, "[data-problem]").map(function (li) { return li.textContent; }).join("\n");
    var ev = main.querySelector("[data-event]");
    if (problems !== m.problems.join("\n")) { return true; }
    if (main.dataset.page !== "site") { return false; }
    var ids = m.nodes.map(function (n) { return n.id; }).join(",");
    var first = m.events.length ? String(m.events[0].id) : "";
    return shown !== ids || (ev ? ev.dataset.event : "") !== first;
  }
  function swap() {
    return fetch(location.pathname, {cache: "no-store"}).then(function (r) { return r.text(); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        if (fresh) { document.querySelector("main").replaceWith(fresh); }
      });
  }
  function tick() {
    fetch("/api/status", {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    }).then(function (m) {
      var main = document.querySelector("main");
      setText(document.getElementById("generated"), m.generated_text);
      m.nodes.forEach(function (n) {
        var root = main.querySelector('[data-node="' + n.id + '"]');
        if (root) { fill(root, n); }
      });
      live.classList.remove("stale");
      live.title = "live: refreshes every " + PERIOD / 1000 + " s";
      return structure(m, main) ? swap() : null;
    }).catch(function (err) {
      live.classList.add("stale");
      live.title = "server unreachable: " + err.message;
    }).then(function () { setTimeout(tick, PERIOD); });
  }
  setTimeout(tick, PERIOD);
}());
