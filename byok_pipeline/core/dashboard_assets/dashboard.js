// The BYOK dashboard's only script: inlined into the page, allowed by its hash in the
// Content-Security-Policy. It reads the page as rendered and never writes markup: the filter
// and the state tiles hide rows, a link to a package's history opens it.
"use strict";
(function () {
  document.documentElement.setAttribute("data-js", "on");

  var input = document.getElementById("package-filter");
  var counter = document.getElementById("package-shown");
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr.package"));
  var tiles = Array.prototype.slice.call(document.querySelectorAll(".tile[data-filter]"));
  var state = "";

  function applyFilter() {
    var wanted = input ? input.value.trim().toLowerCase() : "";
    var shown = 0;
    rows.forEach(function (row) {
      var hit = (state === "" || row.getAttribute("data-state") === state) &&
        (wanted === "" || row.textContent.toLowerCase().indexOf(wanted) >= 0);
      row.hidden = !hit;
      if (hit) { shown += 1; }
    });
    tiles.forEach(function (tile) {
      tile.setAttribute("aria-pressed", String(tile.getAttribute("data-state") === state));
    });
    if (counter) { counter.textContent = String(shown); }
  }

  if (input) { input.addEventListener("input", applyFilter); }
  tiles.forEach(function (tile) {
    tile.addEventListener("click", function () {
      var picked = tile.getAttribute("data-state");
      state = state === picked ? "" : picked;
      applyFilter();
    });
  });

  function openTarget() {
    var id = window.location.hash.slice(1);
    var target = id ? document.getElementById(id) : null;
    if (target && target.tagName === "DETAILS") { target.open = true; }
  }
  window.addEventListener("hashchange", openTarget);
  openTarget();
})();
