"""Container health probe: GET HEALTHCHECK_URL (default: the sidecar's /healthz), exit 0 on 2xx.

Standard library only, so the image needs no curl or wget.
"""

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("HEALTHCHECK_URL", "http://127.0.0.1:9188/healthz")

try:
    with urllib.request.urlopen(URL, timeout=3) as response:
        sys.exit(0 if 200 <= response.status < 300 else 1)
except urllib.error.HTTPError as error:
    print(f"{URL}: HTTP {error.code} {error.read(500).decode(errors='replace')}", file=sys.stderr)
except OSError as error:
    print(f"{URL}: {error}", file=sys.stderr)
sys.exit(1)
