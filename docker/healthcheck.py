"""Container health check for teacher-server: exit 0 only when GET URL answers 200.

Runs with the image's own Python (no curl in the image). Sends the API key when the
container has one, so the check keeps working if readiness is ever put behind auth.
Ignores proxy variables: the check targets the container itself, never through a proxy.
Usage: teacher-healthcheck [URL]   (default http://127.0.0.1:8000/v2/health/ready)
"""

import os
import sys
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/v2/health/ready"


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_URL
    request = urllib.request.Request(url)
    api_key = os.environ.get("TEACHER_API_KEY", "").strip()  # a key from a file ends in a newline
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(request, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as err:  # URLError, HTTPError (non-2xx), timeouts, refused connections
        print(f"teacher-healthcheck: {url}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
