// Small progressive enhancements; every page works without them. No inline scripts (the CSP forbids them).
document.addEventListener("click", function (e) {
  var b = e.target.closest("[data-copy]");
  if (b) {
    var text = b.getAttribute("data-copy");
    var done = function () { b.textContent = "Copied"; setTimeout(function () { b.textContent = "Copy"; }, 1500); };
    if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text).then(done); }
    else { var t = document.createElement("textarea"); t.value = text; document.body.appendChild(t); t.select();
           try { document.execCommand("copy"); } catch (err) {} t.remove(); done(); }
  }
  var back = e.target.closest("[data-back]");
  if (back && history.length > 1) { e.preventDefault(); history.back(); }
});
document.addEventListener("submit", function (e) {
  var msg = e.target.getAttribute("data-confirm");
  if (msg && !window.confirm(msg)) { e.preventDefault(); }
});
document.addEventListener("change", function (e) {
  if (e.target.matches("[data-autosubmit]")) { e.target.form.submit(); }
});
