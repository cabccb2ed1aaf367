// The queue page: decide with the keyboard or the buttons, move with the arrows, reveal blurred
// images, undo your last decision. Writes go to the JSON API with the page's CSRF token.
(function () {
  "use strict";
  var grid = document.getElementById("grid");
  if (!grid) { return; }
  var csrf = grid.dataset.csrf;
  var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
  var current = 0;
  var keys = { a: "approve", r: "reject", e: "escalate" };
  var labels = { approve: "approved", reject: "rejected", escalate: "escalated" };

  function status(text) { document.getElementById("status").textContent = text || ""; }

  function count(id, delta) {
    var el = document.getElementById(id);
    el.textContent = String(Math.max(0, parseInt(el.textContent, 10) + delta));
  }

  function focus(index) {
    if (!cards.length) { return; }
    current = Math.max(0, Math.min(cards.length - 1, index));
    cards.forEach(function (card, i) { card.classList.toggle("focused", i === current); });
    cards[current].focus({ preventScroll: false });
  }

  function columns() {
    if (cards.length < 2) { return 1; }
    var top = cards[0].offsetTop, n = 0;
    while (n < cards.length && cards[n].offsetTop === top) { n += 1; }
    return Math.max(1, n);
  }

  function post(path, body) {
    return fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {})
    }).then(function (response) {
      return response.json().then(function (data) { return { ok: response.ok, status: response.status, data: data }; });
    });
  }

  function mark(card, decision) {
    card.classList.remove("decided-approve", "decided-reject", "decided-escalate", "decided");
    card.querySelector(".decision").textContent = decision ? labels[decision] : "";
    if (decision) { card.classList.add("decided", "decided-" + decision); }
    card.dataset.decision = decision || "";
  }

  function decide(index, decision) {
    var card = cards[index];
    if (!card || card.dataset.busy) { return; }
    var before = card.dataset.decision || "";
    card.dataset.busy = "1";
    post("/api/decisions", { uri: card.dataset.uri, etag: card.dataset.etag, decision: decision }).then(function (r) {
      delete card.dataset.busy;
      if (!r.ok) { status(r.data.error || ("error " + r.status)); return; }
      status("");
      mark(card, decision);
      if (!before) { count("count-done", 1); count("count-mine", 1); count("count-left", -1); }
      if (index === current) { focus(nextUndecided(index)); }
    }).catch(function () { delete card.dataset.busy; status("the server did not answer"); });
  }

  function nextUndecided(index) {
    for (var i = index + 1; i < cards.length; i += 1) { if (!cards[i].dataset.decision) { return i; } }
    return Math.min(index + 1, cards.length - 1);
  }

  function undo() {
    post("/api/undo").then(function (r) {
      if (!r.ok) { status(r.data.error || ("error " + r.status)); return; }
      status("");
      var undone = r.data.undone;
      for (var i = 0; i < cards.length; i += 1) {
        if (cards[i].dataset.uri === undone.uri && cards[i].dataset.etag === undone.etag) {
          mark(cards[i], "");
          count("count-done", -1); count("count-mine", -1); count("count-left", 1);
          focus(i);
          return;
        }
      }
      window.location.reload();  // the item is not on this page: show the queue again
    }).catch(function () { status("the server did not answer"); });
  }

  function reveal(index) {
    var card = cards[index];
    if (card && card.dataset.flagged === "true") { card.classList.toggle("blurred"); }
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT")) { return; }
    var key = event.key;
    if (keys[key]) { decide(current, keys[key]); }
    else if (key === "u") { undo(); }
    else if (key === " " || key === "Spacebar") { reveal(current); }
    else if (key === "ArrowRight") { focus(current + 1); }
    else if (key === "ArrowLeft") { focus(current - 1); }
    else if (key === "ArrowDown") { focus(current + columns()); }
    else if (key === "ArrowUp") { focus(current - columns()); }
    else { return; }
    event.preventDefault();
  });

  cards.forEach(function (card, index) {
    card.addEventListener("click", function (event) {
      var button = event.target.closest("button[data-decision]");
      focus(index);
      if (button) { decide(index, button.dataset.decision); }
      else if (event.target.tagName === "IMG") { reveal(index); }
    });
  });

  focus(0);
}());
