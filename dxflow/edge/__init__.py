"""The edge: the only code that speaks raw HTTP, WebSocket and socket plumbing.

Agent, master and CLI build on it; it imports nothing of ``dxflow.agent``,
``dxflow.master`` or ``dxflow.cli``.

* :mod:`dxflow.edge.tcptable` — the kernel's table of TCP sockets (sock_diag, ``/proc/net/tcp``).
* :mod:`dxflow.edge.peer` — who is at the other end of a connection (the kernel's word: uid).
* :mod:`dxflow.edge.worker` — the gunicorn worker every dxflow server runs: foreign uids refused at
  accept, a deadline on request heads, connections bounded per peer, a thread pool per listener;
  ``ClosingBody``, the one wrapper for "an answer is done".
* :mod:`dxflow.edge.http` — hop-by-hop headers, response heads read and parsed, the hijacked response.
* :mod:`dxflow.edge.pipes` — the one byte pipe between two sockets, half-close included.
* :mod:`dxflow.edge.channelhttp` — HTTP over an SSH channel (the master's requests to agents), readable piecewise.
* :mod:`dxflow.edge.session` — the web console's one security policy (sessions, CSRF, Host and Origin
  checks, security headers, services on origins of their own), for the master's console and an agent's alike.
* :mod:`dxflow.edge.httperrors` — JSON error answers for the agent's and the master's Flask apps.
* :mod:`dxflow.edge.webfiles` — where the web console's static files are.
* :mod:`dxflow.edge.wsclient` — the WebSocket client of ``dxflow shell`` (over the master's Unix socket).
"""
