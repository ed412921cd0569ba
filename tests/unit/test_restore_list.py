"""Which archive entries a role that is not a superuser can restore."""

from __future__ import annotations

from ops.backup.toc import restorable

TOC = """;
; Archive created at 2026-11-26 06:30:00 UTC
;     dbname: dbops
;
; Selected TOC Entries:
;
3; 3079 16389 EXTENSION - pg_stat_statements
3621; 0 0 COMMENT - EXTENSION pg_stat_statements
2; 3079 16385 EXTENSION - pgcrypto
3622; 0 0 COMMENT - EXTENSION pgcrypto
220; 1259 16420 TABLE public agents dbops
3600; 0 16420 TABLE DATA public agents dbops
3400; 826 16500 DEFAULT ACL public DEFAULT PRIVILEGES FOR TABLES dbops
3401; 0 0 ACL public TABLE agents dbops
3402; 0 0 ACL pg_catalog FUNCTION pg_backup_start(label text, fast boolean) postgres
"""


def _entries(listing: str) -> list[str]:
    return [line for line in listing.splitlines() if line and not line.startswith(";")]


def test_non_superuser_skips_untrusted_extensions_their_comments_and_default_acls() -> None:
    plan = restorable(TOC, superuser=False, trusted_extensions={"pgcrypto", "plpgsql"})
    assert plan.skipped == [
        "EXTENSION - pg_stat_statements",
        "COMMENT - EXTENSION pg_stat_statements",
        "DEFAULT ACL public DEFAULT PRIVILEGES FOR TABLES dbops",
        "ACL pg_catalog FUNCTION pg_backup_start(label text, fast boolean) postgres",
    ]
    assert [line.split(" ", 3)[3] for line in _entries(plan.listing)] == [
        "EXTENSION - pgcrypto",
        "COMMENT - EXTENSION pgcrypto",
        "TABLE public agents dbops",
        "TABLE DATA public agents dbops",
        "ACL public TABLE agents dbops",
    ]
    assert plan.entries == 5
    # skipped entries stay in the list as comments, which pg_restore --use-list ignores
    assert ";3; 3079 16389 EXTENSION - pg_stat_statements" in plan.listing


def test_superuser_restores_everything() -> None:
    plan = restorable(TOC, superuser=True, trusted_extensions=set())
    assert plan.skipped == []
    assert _entries(plan.listing) == _entries(TOC)
    assert plan.entries == 9
