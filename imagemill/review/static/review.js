// The queue page: decide with the keyboard or the buttons, move with the arrows, reveal blurred
// images, view them full size, skip, note, give a reason, undo. The page renews its claims while it
// is in use and stops when idle, and marks the items it lost. Writes go to the JSON API with the
// page's CSRF token.
(function () {
  "use strict";
  var grid = document.getElementById("grid");
  if (!grid) { return; }
  var csrf = grid.dataset.csrf;
  var mustReveal = grid.dataset.reveal === "true";
  var leaseMs = parseInt(grid.dataset.lease, 10) * 1000;
  var idleMs = parseInt(grid.dataset.idle, 10) * 1000;
  var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
  var current = 0;
  var keys = { a: "approve", r: "reject", e: "escalate" };
  var labels = { approve: "approved", reject: "rejected", escalate: "escalated" };
  var viewer = document.getElementById("viewer");
  var viewerImg = document.getElementById("viewer-img");
  var zooms = [1, 1.5, 2, 3, 4];
  var zoom = 0;
  var lastInput = Date.now();
  var idle = false;

  function status(text) { document.getElementById("status").textContent = text || ""; }

  function count(id, delta) {
    var el = document.getElementById(id);
    if (el.dataset.capped === "true") { return; }
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

  function open(card) { return !card.dataset.decision && !card.dataset.lost && !card.dataset.skipped; }

  function mark(card, decision) {
    card.classList.remove("decided-approve", "decided-reject", "decided-escalate", "decided");
    card.querySelector(".decision").textContent = decision ? labels[decision] : "";
    if (decision) { card.classList.add("decided", "decided-" + decision); }
    card.dataset.decision = decision || "";
  }

  function lose(card) {
    card.dataset.lost = "1";
    card.classList.add("lost");
    card.querySelector("p.lost").hidden = false;
    card.querySelectorAll(".actions button").forEach(function (button) { button.disabled = true; });
  }

  function decide(index, decision) {
    var card = cards[index];
    if (!card || card.dataset.busy) { return; }
    if (card.dataset.lost) { status("This item is no longer yours: reload for more."); return; }
    if (mustReveal && decision !== "escalate" && card.classList.contains("blurred")) {
      status("Reveal the image (space) before you " + decision + " it.");
      return;
    }
    var before = card.dataset.decision || "";
    var body = { uri: card.dataset.uri, etag: card.dataset.etag, decision: decision };
    var note = card.querySelector("textarea.note").value.trim();
    var reason = card.querySelector("select.reason-code");
    if (note) { body.note = note; }
    if (reason && reason.value) { body.reason = reason.value; }
    card.dataset.busy = "1";
    post("/api/decisions", body).then(function (r) {
      delete card.dataset.busy;
      if (!r.ok) {
        if (r.status === 409 && r.data.decision) {
          status(r.data.error);
          mark(card, "");
          card.querySelector(".decision").textContent = "decided by " + r.data.decision.reviewer;
        } else if (r.status === 409) {
          lose(card);
          status(r.data.error);
        } else {
          status(r.data.error || ("error " + r.status));
        }
        return;
      }
      status("");
      mark(card, decision);
      if (!before) { count("count-mine", 1); count("count-left", -1); if (decision !== "escalate") { count("count-done", 1); } }
      if (index === current) { focus(nextOpen(index)); }
    }).catch(function () { delete card.dataset.busy; status("the server did not answer"); });
  }

  function nextOpen(index) {
    for (var i = index + 1; i < cards.length; i += 1) { if (open(cards[i])) { return i; } }
    return Math.min(index + 1, cards.length - 1);
  }

  function skip(index) {
    var card = cards[index];
    if (!card || card.dataset.decision || card.dataset.lost) { return; }
    post("/api/claims/release", { items: [{ uri: card.dataset.uri, etag: card.dataset.etag }] }).then(function (r) {
      if (!r.ok) { status(r.data.error || ("error " + r.status)); return; }
      card.dataset.skipped = "1";
      card.classList.add("skipped");
      card.querySelector(".decision").textContent = "skipped";
      if (index === current) { focus(nextOpen(index)); }
    }).catch(function () { status("the server did not answer"); });
  }

  function undo() {
    post("/api/undo").then(function (r) {
      if (!r.ok) { status(r.data.error || ("error " + r.status)); return; }
      status("");
      var undone = r.data.undone;
      for (var i = 0; i < cards.length; i += 1) {
        if (cards[i].dataset.uri === undone.uri && cards[i].dataset.etag === undone.etag) {
          mark(cards[i], "");
          count("count-mine", -1); count("count-left", 1);
          if (undone.decision !== "escalate") { count("count-done", -1); }
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

  // -- the full-size view --------------------------------------------------------------------------

  function setZoom(step) {
    zoom = Math.max(0, Math.min(zooms.length - 1, step));
    viewerImg.style.transform = "scale(" + zooms[zoom] + ")";
    document.getElementById("viewer-zoom").textContent = String(zooms[zoom]);
  }

  function openViewer(index) {
    var card = cards[index];
    if (!card) { return; }
    // looking at it full size is looking at it: the card counts as revealed
    card.classList.remove("blurred");
    viewerImg.src = card.dataset.image;
    setZoom(0);
    viewer.hidden = false;
  }

  function closeViewer() { viewer.hidden = true; viewerImg.removeAttribute("src"); }

  // -- whole-page toggles, kept for the next page --------------------------------------------------

  function toggle(name) {
    var on = document.body.classList.toggle(name);
    try { window.localStorage.setItem("imagemill-review-" + name, on ? "1" : ""); } catch (e) { /* private mode */ }
  }

  ["grayscale", "blur-all"].forEach(function (name) {
    try { if (window.localStorage.getItem("imagemill-review-" + name)) { document.body.classList.add(name); } } catch (e) { /* */ }
  });

  function chooseReason(index, number) {
    var select = cards[index] && cards[index].querySelector("select.reason-code");
    if (!select || number >= select.options.length) { return; }
    select.selectedIndex = number;
  }

  // -- claims follow the reviewer ------------------------------------------------------------------

  function held() {
    return cards.filter(function (card) { return open(card); })
      .map(function (card) { return { uri: card.dataset.uri, etag: card.dataset.etag }; });
  }

  function renew() {
    var items = held();
    if (!items.length) { return; }
    post("/api/claims/renew", { items: items }).then(function (r) {
      if (!r.ok) { if (r.status === 401) { status("your session ended: reload to log in"); } return; }
      var lost = {};
      r.data.lost.forEach(function (key) { lost[key.uri + "\u0000" + key.etag] = true; });
      cards.forEach(function (card) {
        if (lost[card.dataset.uri + "\u0000" + card.dataset.etag] && open(card)) { lose(card); }
      });
      if (r.data.lost.length) { status(r.data.lost.length + " item(s) were lost: their lease ended. Reload for more."); }
    }).catch(function () { status("the server did not answer"); });
  }

  function tick() {
    var wasIdle = idle;
    idle = Date.now() - lastInput >= idleMs;
    document.getElementById("idle").hidden = !idle;
    if (!idle) { renew(); }
    return wasIdle;
  }

  function active() {
    var wasIdle = idle;
    lastInput = Date.now();
    if (wasIdle) { tick(); }  // back from idle: find out at once what was lost meanwhile
  }

  ["keydown", "mousedown", "mousemove", "wheel", "touchstart", "input"].forEach(function (name) {
    document.addEventListener(name, active, { passive: true, capture: true });
  });
  window.setInterval(tick, Math.max(1000, Math.floor(leaseMs / 3)));

  // -- keys and clicks -----------------------------------------------------------------------------

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var key = event.key;
    if (!viewer.hidden) {
      if (key === "Escape") { closeViewer(); }
      else if (key === "+" || key === "=") { setZoom(zoom + 1); }
      else if (key === "-") { setZoom(zoom - 1); }
      else if (key === "0") { setZoom(0); }
      else { return; }
      event.preventDefault();
      return;
    }
    var target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT")) {
      if (key === "Escape") { target.blur(); focus(current); event.preventDefault(); }
      return;
    }
    if (keys[key]) { decide(current, keys[key]); }
    else if (key === "u") { undo(); }
    else if (key === "s") { skip(current); }
    else if (key === " " || key === "Spacebar") { reveal(current); }
    else if (key === "Enter") { openViewer(current); }
    else if (key === "n") { var note = cards[current] && cards[current].querySelector("textarea.note"); if (note) { note.focus(); } }
    else if (key === "g") { toggle("grayscale"); }
    else if (key === "b") { toggle("blur-all"); }
    else if (/^[1-9]$/.test(key)) { chooseReason(current, parseInt(key, 10)); }
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
      if (event.target.closest("textarea, select")) { current = index; return; }
      focus(index);
      if (button) { decide(index, button.dataset.decision); }
      else if (event.target.closest("button[data-skip]")) { skip(index); }
      else if (event.target.tagName === "IMG") { openViewer(index); }
    });
  });

  viewer.addEventListener("click", function (event) {
    if (event.target === viewerImg) { setZoom(zoom === 0 ? 2 : 0); } else { closeViewer(); }
  });

  focus(0);
}());
