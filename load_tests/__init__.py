"""Load testing: simulated conversational users against a running avatar server.

`python -m load_tests --url URL --users N --duration S` runs asyncio users
built on `agent.client.SessionClient`, writes a JSON report and a PNG plot,
prints a summary and exits non-zero when an SLO given on the command line
fails. `--soak` watches the server's memory; `--capacity` ramps users until
an SLO breaks. Not collected by the default test run (see README).
"""
