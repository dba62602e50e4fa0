"""What the role may do, checked before the first copy: every missing grant of a
run (or a rollback) as the SQL that gives it, and a read-only database or standby."""
from __future__ import annotations

from .settings import UsageError


class Grants:
    """The Database's grant checks."""

    def check_writable(self, rollback: bool = False) -> None:
        """Everything a run (or a rollback) will write with, checked before it copies
        anything: a run that copies 500 objects and then may not write their rows
        has started what it cannot finish. Every problem goes in one line, each
        missing grant as the SQL to run."""
        with self.conn, self.conn.cursor() as cur:
            problems = self._read_only(cur)
            missing = self._missing_grants(cur, rollback)
            if missing:
                cur.execute("SELECT current_user, quote_ident(current_user)")
                role, quoted_role = cur.fetchone()
                what = ", ".join(phrase for phrase, _ in missing)
                grants = "; ".join(f"{grant} TO {quoted_role}" for _, grant in missing)
                problems.append(f'role "{role}" may not {what}; grant '
                                f"{'it' if len(missing) == 1 else 'them'}: {grants}")
            if (self.cfg.create_index and self.plan_name == "snapshot" and not rollback
                    and not self._owns_table(cur)):
                problems.append(f"--create-index needs the owner of \"{self.table_name}\": run "
                                "it as the owner, or have the owner run CREATE INDEX "
                                f"CONCURRENTLY ON {self.quoted_table(cur)} "
                                f"({self.col.as_string(cur)})")
        if problems:
            raise UsageError("; and ".join(problems))

    @staticmethod
    def _read_only(cur) -> list[str]:
        # A fresh transaction: transaction_read_only then shows default_transaction_read_only.
        cur.execute("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')::bool")
        standby, read_only = cur.fetchone()
        if standby:
            return ["the database is a standby in recovery (read-only) and this run writes "
                    "rows; point DB_CONN_STRING at the primary"]
        if read_only:
            return ["the database session is read-only (default_transaction_read_only is on: "
                    "a read replica, or set for this role or database) and this run writes "
                    "rows; point DB_CONN_STRING at the primary"]
        return []

    @staticmethod
    def _quote(cur, expr: str, *args) -> str:
        """A name as PostgreSQL would write it in SQL (quoted only when it must be)."""
        cur.execute(f"SELECT quote_ident({expr})", args)
        return cur.fetchone()[0]

    def _missing_grants(self, cur, rollback: bool) -> list[tuple[str, str]]:
        """(what the role may not do, the GRANT that lets it) for each missing grant."""
        table = self.quoted_table(cur)
        qtable = ".".join(self._quote(cur, "%s", p) for p in self.table.strings)
        missing = []
        cur.execute("SELECT has_table_privilege(%s, 'SELECT'), "
                    # UPDATE of the path column alone is enough: a column-level grant will do
                    "has_column_privilege(%s, %s, 'UPDATE')", (table, table, self.column))
        privs = [p for p, ok in zip(("SELECT", "UPDATE"), cur.fetchone()) if not ok]
        if privs:
            missing.append((f'{", ".join(privs)} table "{self.table_name}"',
                            f"GRANT {', '.join(privs)} ON {qtable}"))
        journal = self.journal.as_string(cur)
        jname = ".".join(self.journal.strings)
        qjournal = ".".join(self._quote(cur, "%s", p) for p in self.journal.strings)
        cur.execute("SELECT to_regclass(%s)", (journal,))
        if cur.fetchone()[0] is not None:
            # The run inserts (RETURNING: SELECT) and its rollback updates rolled_back_at.
            needed = ("SELECT", "UPDATE") if rollback else ("SELECT", "INSERT", "UPDATE")
            cur.execute("SELECT " + ", ".join(f"has_table_privilege(%s, '{p}')" for p in needed),
                        (journal,) * len(needed))
            privs = [p for p, ok in zip(needed, cur.fetchone()) if not ok]
            if privs:
                missing.append((f'{", ".join(privs)} table "{jname}"',
                                f"GRANT {', '.join(privs)} ON {qjournal}"))
            # INSERT takes the next id from the journal's sequence: USAGE (or UPDATE) on it.
            cur.execute("SELECT s, has_sequence_privilege(s, 'USAGE, UPDATE') "
                        "FROM pg_get_serial_sequence(%s, 'id') AS s WHERE s IS NOT NULL",
                        (journal,))
            seq = cur.fetchone()
            if seq and not seq[1] and not rollback:
                missing.append((f'use the journal\'s sequence "{seq[0]}"',
                                f"GRANT USAGE ON SEQUENCE {seq[0]}"))
        elif not rollback:
            # The first run creates the journal, in the schema its name resolves to.
            schema = self.journal.strings[0] if len(self.journal.strings) > 1 else None
            cur.execute("SELECT s, has_schema_privilege(s, 'CREATE') FROM "
                        "(SELECT coalesce(%s, current_schema()) AS s) x", (schema,))
            schema, ok = cur.fetchone()
            if not ok:
                missing.append((f'CREATE in schema "{schema}" (to create the journal '
                                f'"{jname}")',
                                f"GRANT CREATE ON SCHEMA {self._quote(cur, '%s', schema)}"))
        if self.plan_name == "snapshot" and not self.cfg.create_index and not rollback:
            # No index on the path column: the run's snapshot is a TEMP table.
            cur.execute("SELECT current_database(), "
                        "has_database_privilege(current_database(), 'TEMPORARY')")
            database, ok = cur.fetchone()
            if not ok:
                quoted = self._quote(cur, "%s", database)
                missing.append((f'create TEMPORARY tables in database "{database}" (for '
                                f"the snapshot: no index on {self.column})",
                                f"GRANT TEMPORARY ON DATABASE {quoted}"))
        return missing

    def _owns_table(self, cur) -> bool:
        cur.execute("SELECT pg_has_role(relowner, 'USAGE') FROM pg_class "
                    "WHERE oid = to_regclass(%s)", (self.quoted_table(cur),))
        return cur.fetchone()[0]
