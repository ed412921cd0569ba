"""Healthy when moto's server answers an S3 request (ListBuckets) on its port."""

import sys
import urllib.error
import urllib.request

try:
    with urllib.request.urlopen("http://127.0.0.1:5000/", timeout=2) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except (OSError, urllib.error.URLError):
    sys.exit(1)
