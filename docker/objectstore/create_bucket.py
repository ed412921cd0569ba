"""Create the demo bucket in the objectstore service, if missing (run inside its container).

The bucket's name comes from argv; moto's demo server takes any key, so a fixed setup key is
used here and the stack's own credentials never leave .env.
"""

import sys

import boto3
from botocore.exceptions import ClientError

s3 = boto3.client(
    "s3",
    endpoint_url="http://127.0.0.1:5000",
    region_name="us-east-1",
    aws_access_key_id="objectstore-setup",
    aws_secret_access_key="objectstore-setup",
)
name = sys.argv[1]
try:
    s3.head_bucket(Bucket=name)
    print(f"bucket {name} exists")
except ClientError:
    s3.create_bucket(Bucket=name)
    print(f"bucket {name} created")
