"""``exoctl token create|list|revoke`` against the real API app, and the last writer in describe."""
from __future__ import annotations

import json

from tests.cli.cli_helpers import TOKEN

MANIFEST = """apiVersion: exo.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: llama
spec:
  model:
    source: hf://org/model
"""


def test_token_create_prints_the_token_alone_and_it_works_with_its_role_only(exoctl, exoctl_env):
    created = exoctl("token", "create", "--role", "edit", "--ttl", "30d", "--description", "ci deploys")
    assert created.code == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n" and token.startswith("exo_") and TOKEN not in token
    assert "(edit) created, expires" in created.stderr

    as_editor = {**exoctl_env, "EXOCTL_TOKEN": token}
    applied = exoctl("apply", "-f", "-", input=MANIFEST, env=as_editor)
    assert applied.code == 0, applied.stderr
    refused = exoctl("token", "list", env=as_editor)
    assert refused.code == 1 and "Forbidden" in refused.stderr and 'needs role "admin"' in refused.stderr

    described = exoctl("describe", "md", "llama")
    ident = token.split("_")[1]
    assert f"Last Writer:  token {ident} (edit)" in described.stdout


def test_token_list_shows_ids_roles_and_states_but_never_a_token(exoctl):
    token = exoctl("token", "create", "--role", "view").stdout.strip()
    ident = token.split("_")[1]
    table = exoctl("token", "list")
    assert table.code == 0 and table.stdout.startswith("ID")
    assert ident in table.stdout and "view" in table.stdout and "active" in table.stdout and "never" in table.stdout
    listed = json.loads(exoctl("token", "list", "-o", "json").stdout)["items"]
    assert [(t["id"], t["role"], t["revoked"]) for t in listed] == [(ident, "view", False)]
    assert token not in table.stdout + json.dumps(listed) and "sha256" not in json.dumps(listed)


def test_a_revoked_token_is_refused_and_revoking_an_unknown_id_names_it(exoctl, exoctl_env):
    token = exoctl("token", "create", "--role", "view").stdout.strip()
    ident = token.split("_")[1]
    assert exoctl("get", "md", env={**exoctl_env, "EXOCTL_TOKEN": token}).code == 0
    revoked = exoctl("token", "revoke", ident)
    assert revoked.code == 0 and revoked.stdout.strip() == f"token {ident} revoked"
    refused = exoctl("get", "md", env={**exoctl_env, "EXOCTL_TOKEN": token})
    assert refused.code == 1 and "unauthorized" in refused.stderr
    assert "revoked" in json.dumps(json.loads(exoctl("token", "list", "-o", "json").stdout))
    missing = exoctl("token", "revoke", "abc123")
    assert missing.code == 1 and 'token "abc123" not found' in missing.stderr


def test_token_create_refuses_a_bad_role_or_ttl_on_the_command_line(exoctl):
    bad_role = exoctl("token", "create", "--role", "root")
    assert bad_role.code == 2 and "--role" in bad_role.stderr
    bad_ttl = exoctl("token", "create", "--role", "view", "--ttl", "soon")
    assert bad_ttl.code == 2 and "--ttl" in bad_ttl.stderr
