#!/usr/bin/env bash
# Raspberry Pi deployment: not yet (the deployment issue builds it).
echo "deploy.sh: not yet -- Raspberry Pi deployment is built in its own issue" >&2
exit 1
