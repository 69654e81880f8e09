//! Schema migrations, applied in order at start. `PRAGMA user_version` records how many ran.
//!
//! A migration is never edited once released; a change is a new entry at the end.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: apps, images, layers, history, events.
    r#"
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
    // 2: device-wide settings (the ULA prefix, …).
    r#"
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // 3: each app's host number in the device's internal IPv4 net. Not tied to `apps` by a
    // foreign key: the address is taken before the app is recorded (its network is wired
    // first); allocations no app owns are released at start.
    r#"
    CREATE TABLE app_ipv4 (
        app TEXT PRIMARY KEY,
        host INTEGER NOT NULL UNIQUE
    );
    "#,
    // 4: the images of an app's further containers (`[[container]]` with an image of its own),
    // and what an app's data outside its volumes needs: the passwords of its database role and
    // its cache, and its slot of host user ids for its volumes. `app_data` outlives the app
    // while its data is kept (`rm` without `--purge-data`): `kept` says so.
    r#"
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
];

pub fn apply(conn: &mut Connection) -> Result<(), StoreError> {
    let found: usize = conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if found > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found) {
        let version = i + 1;
        let tx = conn
            .transaction()
            .map_err(|source| StoreError::Migrate { version, source })?;
        tx.execute_batch(sql)
            .map_err(|source| StoreError::Migrate { version, source })?;
        tx.pragma_update(None, "user_version", version as i64)
            .map_err(|source| StoreError::Migrate { version, source })?;
        tx.commit()
            .map_err(|source| StoreError::Migrate { version, source })?;
        tracing::info!(version, "state database migrated");
    }
    Ok(())
}
