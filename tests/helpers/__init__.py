"""Real-peer test harness: SIPp runs, headless baresip phones, speech WAVs and audio comparison.

Used by tests/system (the harness's own tests) and by the end-to-end tests that drive the stack.
"""
