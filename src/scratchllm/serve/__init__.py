"""The OpenAI-compatible HTTP server and its chat page.

app.py      routes over the engine (`create_app`, `serve`, `ServerThread`)
schemas.py  request bodies, validated at the boundary, and OpenAI's error body
guards.py   what one request may ask: body size, prompts, tokens, Host names, the API key
static/     the self-contained chat page served at /
"""
