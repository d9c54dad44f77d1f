"""The SIP Server: registrar (``registrar``), B2BUA call control (``b2bua``, built on ``legs``,
``bridge``, ``in_dialog`` and ``rejoin``; ``call`` its replicable state), tenant recording policy
(``policy``), recording-bridge SDP rewriting (``media``), session timers (``session_timer``) and the
daemon (``daemon``). The flows are drawn in docs/CALL_FLOWS.md."""
