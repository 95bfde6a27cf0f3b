// The terminal into a running job (templates/job_terminal.html): xterm.js over the portal's websocket. Binary
// messages carry keystrokes and output; a text message is a resize ({"resize": [rows, cols]}).
(function () {
  var el = document.getElementById("job-terminal");
  if (!el || typeof Terminal === "undefined") { return; }
  var rows = 30, cols = 110;
  var term = new Terminal({cursorBlink: true, rows: rows, cols: cols});
  term.open(el);
  var state = document.getElementById("job-terminal-state");
  var url = (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + el.getAttribute("data-ws") +
    "?rows=" + rows + "&cols=" + cols;
  var ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  var enc = new TextEncoder();
  ws.onopen = function () { state.textContent = "Connected."; term.focus(); };
  ws.onmessage = function (e) { term.write(new Uint8Array(e.data)); };
  ws.onclose = function () { state.textContent = "Disconnected."; term.write("\r\n[the terminal has ended]\r\n"); };
  term.onData(function (d) { if (ws.readyState === 1) { ws.send(enc.encode(d)); } });
  term.onResize(function (s) { if (ws.readyState === 1) { ws.send(JSON.stringify({resize: [s.rows, s.cols]})); } });
  window.nagayaJobTerm = term; window.nagayaJobWs = ws;
})();
