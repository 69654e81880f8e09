//! Schema migrations, applied in order at start. `PRAGMA user_version` records how many ran.
//!
//! A migration is never edited once released; a change is a new entry at the end, with its
//! way back. The way back of every migration that ran is kept in the database itself
//! (`schema_down`), so that an older agent (the other slot, after an OS update was rolled
//! back) can undo the migrations it does not know before it opens the data. A migration
//! without a way back cannot be written: `down` is not optional.

use rusqlite::Connection;

use super::StoreError;

pub struct Migration {
    pub up: &'static str,
    /// Undoes `up` (run by whichever agent finds the schema newer than it knows).
    pub down: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    // 1: apps, images, layers, history, events.
    Migration {
        up: r#"
    CREATE TABLE layers (
        id INTEGER PRIMARY KEY,
        digest TEXT NOT NULL UNIQUE,
        diff_id TEXT,
        media_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        unpacked_bytes INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('unpacking', 'ready'))
    );
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        digest TEXT NOT NULL UNIQUE,
        config_digest TEXT NOT NULL,
        config BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE image_layers (
        image_id INTEGER NOT NULL REFERENCES images(id),
        position INTEGER NOT NULL,
        layer_id INTEGER NOT NULL REFERENCES layers(id),
        PRIMARY KEY (image_id, position)
    );
    CREATE INDEX image_layers_layer ON image_layers(layer_id);
    CREATE TABLE image_names (
        image_id INTEGER NOT NULL REFERENCES images(id),
        reference TEXT NOT NULL,
        resolved_digest TEXT NOT NULL,
        PRIMARY KEY (image_id, reference)
    );
    CREATE TABLE apps (
        name TEXT PRIMARY KEY,
        manifest TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images(id),
        pinned TEXT NOT NULL,
        phase TEXT NOT NULL CHECK (phase IN ('installed', 'removing')),
        desired TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        app TEXT NOT NULL,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX history_app ON history(app, id);
    CREATE TRIGGER history_no_update BEFORE UPDATE ON history
        BEGIN SELECT RAISE(ABORT, 'history is append-only'); END;
    CREATE TRIGGER history_no_delete BEFORE DELETE ON history
        BEGIN SELECT RAISE(ABORT, 'history is append-only'); END;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        app TEXT NOT NULL,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_app ON events(app, id);
    "#,
        down: "DROP TABLE events; DROP TABLE history; DROP TABLE apps; DROP TABLE image_names; DROP TABLE image_layers; DROP TABLE images; DROP TABLE layers;",
    },
    // 2: device-wide settings (the ULA prefix, …).
    Migration {
        up: r#"
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
        down: "DROP TABLE settings;",
    },
    // 3: each app's host number in the device's internal IPv4 net. Not tied to `apps` by a
    // foreign key: the address is taken before the app is recorded (its network is wired
    // first); allocations no app owns are released at start.
    Migration {
        up: r#"
    CREATE TABLE app_ipv4 (
        app TEXT PRIMARY KEY,
        host INTEGER NOT NULL UNIQUE
    );
    "#,
        down: "DROP TABLE app_ipv4;",
    },
    // 4: the images of an app's further containers (`[[container]]` with an image of its own),
    // and what an app's data outside its volumes needs: the passwords of its database role and
    // its cache, and its slot of host user ids for its volumes. `app_data` outlives the app
    // while its data is kept (`rm` without `--purge-data`): `kept` says so.
    Migration {
        up: r#"
    CREATE TABLE app_containers (
        app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
        container TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images(id),
        pinned TEXT NOT NULL,
        PRIMARY KEY (app, container)
    );
    CREATE TABLE app_data (
        app TEXT PRIMARY KEY,
        db_password TEXT NOT NULL,
        cache_password TEXT NOT NULL,
        id_slot INTEGER NOT NULL UNIQUE,
        kept INTEGER NOT NULL DEFAULT 0
    );
    "#,
        down: "DROP TABLE app_data; DROP TABLE app_containers;",
    },
];

/// Made before any migration: the ways back of the migrations that ran.
const DOWN_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS schema_down (version INTEGER PRIMARY KEY, sql TEXT NOT NULL)";

pub fn apply(conn: &mut Connection) -> Result<(), StoreError> {
    apply_these(conn, MIGRATIONS)
}

/// Brings the schema to `migrations.len()`: forward, or back with the ways back a newer
/// agent stored.
pub fn apply_these(conn: &mut Connection, migrations: &[Migration]) -> Result<(), StoreError> {
    let found: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    let known = migrations.len();
    conn.execute_batch(DOWN_TABLE)
        .map_err(|source| StoreError::Migrate {
            version: found,
            source,
        })?;
    if found > known {
        // Newer data than this agent knows: undo, newest first, with the newer agent's own
        // ways back, all in one transaction (all or nothing).
        let tx = conn.transaction()?;
        for version in (known + 1..=found).rev() {
            let down: Option<String> = tx
                .query_row(
                    "SELECT sql FROM schema_down WHERE version = ?1",
                    [version as i64],
                    |r| r.get(0),
                )
                .ok();
            let Some(down) = down else {
                return Err(StoreError::TooNew { found, known });
            };
            tx.execute_batch(&down)
                .map_err(|source| StoreError::Migrate { version, source })?;
            tx.execute(
                "DELETE FROM schema_down WHERE version = ?1",
                [version as i64],
            )?;
        }
        tx.pragma_update(None, "user_version", known as i64)?;
        tx.commit()?;
        tracing::warn!(
            from = found,
            to = known,
            "state database migrated back (written by a newer agent)"
        );
        return Ok(());
    }
    for (i, m) in migrations.iter().enumerate().skip(found) {
        let version = i + 1;
        let tx = conn
            .transaction()
            .map_err(|source| StoreError::Migrate { version, source })?;
        tx.execute_batch(m.up)
            .map_err(|source| StoreError::Migrate { version, source })?;
        tx.execute(
            "INSERT OR REPLACE INTO schema_down (version, sql) VALUES (?1, ?2)",
            rusqlite::params![version as i64, m.down],
        )
        .map_err(|source| StoreError::Migrate { version, source })?;
        tx.pragma_update(None, "user_version", version as i64)
            .map_err(|source| StoreError::Migrate { version, source })?;
        tx.commit()
            .map_err(|source| StoreError::Migrate { version, source })?;
        tracing::info!(version, "state database migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(conn: &Connection) -> Vec<String> {
        let mut st = conn
            .prepare("SELECT type || ' ' || name || ' ' || ifnull(sql, '') FROM sqlite_master WHERE name != 'schema_down' ORDER BY name")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn version(conn: &Connection) -> usize {
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .unwrap() as usize
    }

    /// Every migration's way back returns the schema to what it was before it, and an
    /// older agent (fewer migrations) opens data a newer one migrated.
    #[test]
    fn every_migration_has_a_way_back() {
        for n in 0..MIGRATIONS.len() {
            let mut conn = Connection::open_in_memory().unwrap();
            apply_these(&mut conn, &MIGRATIONS[..n]).unwrap();
            let before = schema(&conn);
            apply_these(&mut conn, MIGRATIONS).unwrap();
            assert_eq!(version(&conn), MIGRATIONS.len());
            // The older agent, knowing n migrations, opens it.
            apply_these(&mut conn, &MIGRATIONS[..n]).unwrap();
            assert_eq!(version(&conn), n);
            assert_eq!(schema(&conn), before, "back to {n}");
            // And the newer one again.
            apply_these(&mut conn, MIGRATIONS).unwrap();
            assert_eq!(version(&conn), MIGRATIONS.len());
        }
    }

    #[test]
    fn data_without_a_way_back_is_refused_untouched() {
        let mut conn = Connection::open_in_memory().unwrap();
        apply(&mut conn).unwrap();
        let n = MIGRATIONS.len();
        conn.execute_batch(&format!(
            "CREATE TABLE future (x); PRAGMA user_version = {};",
            n + 1
        ))
        .unwrap();
        let e = apply(&mut conn).unwrap_err();
        assert!(
            matches!(e, StoreError::TooNew { found, known } if found == n + 1 && known == n),
            "{e}"
        );
        assert_eq!(version(&conn), n + 1, "nothing was undone");
        // With the newer agent's way back stored, it goes back.
        conn.execute(
            "INSERT INTO schema_down (version, sql) VALUES (?1, 'DROP TABLE future')",
            [(n + 1) as i64],
        )
        .unwrap();
        apply(&mut conn).unwrap();
        assert_eq!(version(&conn), n);
        let left: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'future'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
    }
}
