//! State in SQLite: apps, images, layers, the append-only history and recent events.
//!
//! Invariant: only this module runs SQL. One connection, behind one mutex (SQLite gets one
//! owner); every statement is short. Multi-row changes run in one transaction, so a `kill -9`
//! leaves either the old or the new state.

mod migrations;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::images::digest::Digest;
use crate::manifest::AppName;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state database migration to version {version} failed")]
    Migrate {
        version: usize,
        source: rusqlite::Error,
    },
    #[error("the state database has version {found}, newer than this agent understands ({known})")]
    TooNew { found: usize, known: usize },
    #[error("state database")]
    Sql(#[from] rusqlite::Error),
    #[error("the state database holds an invalid value in {what}: {value:?}")]
    Corrupt { what: &'static str, value: String },
    #[error("no IPv4 address is left for another app ({0} are in use)")]
    AddressesExhausted(usize),
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub struct Store {
    conn: Mutex<Connection>,
}

/// What an app should be doing; survives agent restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

impl Desired {
    fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }
    fn parse(s: &str) -> Result<Desired> {
        match s {
            "running" => Ok(Desired::Running),
            "stopped" => Ok(Desired::Stopped),
            _ => Err(StoreError::Corrupt {
                what: "apps.desired",
                value: s.into(),
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Installed,
    /// `rm` started; an agent that finds this at start finishes the removal.
    Removing,
}

#[derive(Debug, Clone)]
pub struct AppRow {
    pub name: AppName,
    pub manifest: String,
    pub image_id: i64,
    /// `reference@digest` the app is pinned to.
    pub pinned: String,
    pub phase: Phase,
    pub desired: Desired,
    pub created_at: i64,
    pub updated_at: i64,
    /// The images of its `[[container]]`s that have one of their own.
    pub containers: Vec<ContainerImage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerImage {
    pub container: String,
    pub image_id: i64,
    pub pinned: String,
}

/// What an app's data outside its volumes needs (see migration 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppData {
    pub db_password: String,
    pub cache_password: String,
    /// Its slot of host user ids (`runtime::idmap`).
    pub id_slot: u32,
    /// The app was removed with its data kept.
    pub kept: bool,
}

#[derive(Debug, Clone)]
pub struct LayerRow {
    pub id: i64,
    pub digest: Digest,
    pub diff_id: Option<Digest>,
    pub media_type: String,
    pub size: u64,
    pub unpacked_bytes: u64,
    pub ready: bool,
}

#[derive(Debug, Clone)]
pub struct ImageRow {
    pub id: i64,
    pub digest: Digest,
    pub config_digest: Digest,
    pub config: Vec<u8>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryEntry {
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    pub at: i64,
    pub kind: String,
    pub message: String,
}

/// An image with what it costs and who uses it.
#[derive(Debug, Clone)]
pub struct ImageUsage {
    pub image: ImageRow,
    pub references: Vec<String>,
    pub layer_ids: Vec<i64>,
    pub apps: Vec<String>,
}

/// Events kept per app; older ones are dropped (history, not events, is the permanent record).
const EVENTS_KEPT: i64 = 200;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn digest(what: &'static str, s: String) -> Result<Digest> {
    s.parse()
        .map_err(|_| StoreError::Corrupt { what, value: s })
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
        )
        .map_err(open_err)?;
        migrations::apply(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- layers ----

    pub fn layer(&self, digest: &Digest) -> Result<Option<LayerRow>> {
        self.conn()
            .query_row(
                "SELECT id, digest, diff_id, media_type, size, unpacked_bytes, state FROM layers WHERE digest = ?1",
                [digest.to_string()],
                layer_row,
            )
            .optional()?
            .transpose()
    }

    /// Records that a layer is being unpacked; its directory is `layers/<id>`.
    pub fn begin_layer(
        &self,
        digest: &Digest,
        diff_id: Option<&Digest>,
        media_type: &str,
        size: u64,
    ) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO layers (digest, diff_id, media_type, size, unpacked_bytes, state) VALUES (?1, ?2, ?3, ?4, 0, 'unpacking')",
            params![digest.to_string(), diff_id.map(|d| d.to_string()), media_type, size as i64],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn finish_layer(&self, id: i64, unpacked_bytes: u64) -> Result<()> {
        self.conn().execute(
            "UPDATE layers SET state = 'ready', unpacked_bytes = ?2 WHERE id = ?1",
            params![id, unpacked_bytes as i64],
        )?;
        Ok(())
    }

    pub fn delete_layer(&self, id: i64) -> Result<()> {
        self.conn()
            .execute("DELETE FROM layers WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Layers no image uses (including half-unpacked ones): garbage after a crash or prune.
    pub fn orphan_layers(&self) -> Result<Vec<i64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id FROM layers WHERE state != 'ready' OR id NOT IN (SELECT layer_id FROM image_layers)",
        )?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        Ok(ids)
    }

    pub fn layer_ids(&self) -> Result<Vec<i64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id FROM layers")?;
        let ids = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        Ok(ids)
    }

    pub fn layers_of(&self, image_id: i64) -> Result<Vec<LayerRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT l.id, l.digest, l.diff_id, l.media_type, l.size, l.unpacked_bytes, l.state
             FROM image_layers il JOIN layers l ON l.id = il.layer_id WHERE il.image_id = ?1 ORDER BY il.position",
        )?;
        let rows = stmt
            .query_map([image_id], layer_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().collect()
    }

    // ---- images ----

    pub fn image_by_digest(&self, digest: &Digest) -> Result<Option<ImageRow>> {
        self.conn()
            .query_row(
                "SELECT id, digest, config_digest, config, created_at FROM images WHERE digest = ?1",
                [digest.to_string()],
                image_row,
            )
            .optional()?
            .transpose()
    }

    pub fn image(&self, id: i64) -> Result<Option<ImageRow>> {
        self.conn()
            .query_row(
                "SELECT id, digest, config_digest, config, created_at FROM images WHERE id = ?1",
                [id],
                image_row,
            )
            .optional()?
            .transpose()
    }

    /// Records a complete image (all layers ready) and the reference that named it.
    pub fn insert_image(
        &self,
        digest: &Digest,
        config_digest: &Digest,
        config: &[u8],
        layer_ids: &[i64],
        reference: &str,
        resolved: &Digest,
    ) -> Result<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<i64> = tx
            .query_row(
                "SELECT id FROM images WHERE digest = ?1",
                [digest.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        let id = match existing {
            Some(id) => id,
            None => {
                tx.execute(
                    "INSERT INTO images (digest, config_digest, config, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![digest.to_string(), config_digest.to_string(), config, now_ms()],
                )?;
                let id = tx.last_insert_rowid();
                for (pos, layer) in layer_ids.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO image_layers (image_id, position, layer_id) VALUES (?1, ?2, ?3)",
                        params![id, pos as i64, layer],
                    )?;
                }
                id
            }
        };
        tx.execute(
            "INSERT OR REPLACE INTO image_names (image_id, reference, resolved_digest) VALUES (?1, ?2, ?3)",
            params![id, reference, resolved.to_string()],
        )?;
        tx.commit()?;
        Ok(id)
    }

    pub fn images(&self) -> Result<Vec<ImageUsage>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, digest, config_digest, config, created_at FROM images ORDER BY id",
        )?;
        let images = stmt
            .query_map([], image_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut out = Vec::new();
        for image in images {
            let image = image?;
            let strings = |sql: &str| -> Result<Vec<String>> {
                let mut s = conn.prepare(sql)?;
                let v = s
                    .query_map([image.id], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(v)
            };
            let references = strings(
                "SELECT reference FROM image_names WHERE image_id = ?1 ORDER BY reference",
            )?;
            let apps = strings(
                "SELECT name FROM apps WHERE image_id = ?1
                 UNION SELECT app FROM app_containers WHERE image_id = ?1 ORDER BY 1",
            )?;
            let mut s = conn.prepare(
                "SELECT layer_id FROM image_layers WHERE image_id = ?1 ORDER BY position",
            )?;
            let layer_ids = s
                .query_map([image.id], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            out.push(ImageUsage {
                image,
                references,
                layer_ids,
                apps,
            });
        }
        Ok(out)
    }

    /// Deletes an image no app uses. Returns false if an app uses it.
    pub fn delete_image_if_unused(&self, id: i64) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let used: i64 = tx.query_row(
            "SELECT (SELECT COUNT(*) FROM apps WHERE image_id = ?1)
                  + (SELECT COUNT(*) FROM app_containers WHERE image_id = ?1)",
            [id],
            |r| r.get(0),
        )?;
        if used > 0 {
            return Ok(false);
        }
        tx.execute("DELETE FROM image_names WHERE image_id = ?1", [id])?;
        tx.execute("DELETE FROM image_layers WHERE image_id = ?1", [id])?;
        tx.execute("DELETE FROM images WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(true)
    }

    // ---- apps ----

    /// Records an installed app and its first history entry, atomically.
    pub fn insert_app(&self, app: &AppRow, actor: &str, detail: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO apps (name, manifest, image_id, pinned, phase, desired, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 'installed', ?5, ?6, ?6)",
            params![app.name.as_str(), app.manifest, app.image_id, app.pinned, app.desired.as_str(), app.created_at],
        )?;
        put_containers(&tx, &app.name, &app.containers)?;
        history(&tx, app.name.as_str(), actor, "install", detail)?;
        tx.commit()?;
        Ok(())
    }

    /// Moves an app to a new manifest and image, with its history entry, atomically.
    pub fn update_app(&self, app: &AppRow, actor: &str, detail: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let name = &app.name;
        tx.execute(
            "UPDATE apps SET manifest = ?2, image_id = ?3, pinned = ?4, updated_at = ?5 WHERE name = ?1 AND phase = 'installed'",
            params![name.as_str(), app.manifest, app.image_id, app.pinned, now_ms()],
        )?;
        tx.execute("DELETE FROM app_containers WHERE app = ?1", [name.as_str()])?;
        put_containers(&tx, name, &app.containers)?;
        history(&tx, name.as_str(), actor, "update", detail)?;
        tx.commit()?;
        Ok(())
    }

    pub fn app(&self, name: &AppName) -> Result<Option<AppRow>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT name, manifest, image_id, pinned, phase, desired, created_at, updated_at FROM apps WHERE name = ?1",
                [name.as_str()],
                app_row,
            )
            .optional()?
            .transpose()?;
        row.map(|r| with_containers(&conn, r)).transpose()
    }

    pub fn apps(&self) -> Result<Vec<AppRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, manifest, image_id, pinned, phase, desired, created_at, updated_at FROM apps ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], app_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|r| with_containers(&conn, r?))
            .collect()
    }

    // ---- data outside volumes ----

    /// The app's data record, made (with fresh passwords and the lowest free id slot below
    /// `slots`) if it has none. A record kept from an earlier install of the same name is
    /// taken over as it is: the kept database and volumes stay reachable.
    pub fn app_data_or_insert(
        &self,
        name: &AppName,
        slots: u32,
        mut password: impl FnMut() -> String,
    ) -> Result<AppData> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(d) = get_app_data(&tx, name)? {
            return Ok(d);
        }
        let taken: Vec<u32> = {
            let mut stmt = tx.prepare("SELECT id_slot FROM app_data ORDER BY id_slot")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut slot = 0;
        for t in &taken {
            if *t == slot {
                slot += 1;
            } else if *t > slot {
                break;
            }
        }
        if slot >= slots {
            return Err(StoreError::AddressesExhausted(taken.len()));
        }
        let d = AppData {
            db_password: password(),
            cache_password: password(),
            id_slot: slot,
            kept: false,
        };
        tx.execute(
            "INSERT INTO app_data (app, db_password, cache_password, id_slot, kept) VALUES (?1, ?2, ?3, ?4, 0)",
            params![name.as_str(), d.db_password, d.cache_password, d.id_slot],
        )?;
        tx.commit()?;
        Ok(d)
    }

    pub fn app_data(&self, name: &AppName) -> Result<Option<AppData>> {
        get_app_data(&self.conn(), name)
    }

    /// Marks the data of an app being removed as kept (it outlives the app), or forgets it.
    pub fn set_data_kept(&self, name: &AppName, kept: bool) -> Result<()> {
        self.conn().execute(
            "UPDATE app_data SET kept = ?2 WHERE app = ?1",
            params![name.as_str(), kept],
        )?;
        Ok(())
    }

    pub fn delete_app_data(&self, name: &AppName) -> Result<()> {
        self.conn()
            .execute("DELETE FROM app_data WHERE app = ?1", [name.as_str()])?;
        Ok(())
    }

    /// Data records no app owns and no earlier app kept: left by installs that did not finish.
    pub fn unowned_app_data(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT app FROM app_data WHERE kept = 0 AND app NOT IN (SELECT name FROM apps) ORDER BY app",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Changes what the app should be doing; a history entry records who and when.
    pub fn set_desired(&self, name: &AppName, desired: Desired, actor: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let before: Option<String> = tx
            .query_row(
                "SELECT desired FROM apps WHERE name = ?1",
                [name.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        if before.as_deref() != Some(desired.as_str()) {
            tx.execute(
                "UPDATE apps SET desired = ?2, updated_at = ?3 WHERE name = ?1",
                params![name.as_str(), desired.as_str(), now_ms()],
            )?;
            let action = match desired {
                Desired::Running => "start",
                Desired::Stopped => "stop",
            };
            let detail = format!(
                "desired state {} -> {}",
                before.as_deref().unwrap_or("?"),
                desired.as_str()
            );
            history(&tx, name.as_str(), actor, action, &detail)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn record(&self, name: &AppName, actor: &str, action: &str, detail: &str) -> Result<()> {
        let conn = self.conn();
        history(&conn, name.as_str(), actor, action, detail)
    }

    pub fn mark_removing(&self, name: &AppName, actor: &str, detail: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE apps SET phase = 'removing', updated_at = ?2 WHERE name = ?1",
            params![name.as_str(), now_ms()],
        )?;
        history(&tx, name.as_str(), actor, "remove", detail)?;
        tx.commit()?;
        Ok(())
    }

    pub fn delete_app(&self, name: &AppName) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM events WHERE app = ?1", [name.as_str()])?;
        tx.execute("DELETE FROM apps WHERE name = ?1", [name.as_str()])?;
        tx.execute("DELETE FROM app_ipv4 WHERE app = ?1", [name.as_str()])?;
        tx.commit()?;
        Ok(())
    }

    // ---- IPv4 host numbers ----

    /// The app's host number, allocated (the lowest free one in `hosts`) if it has none yet.
    pub fn allocate_ipv4(
        &self,
        name: &AppName,
        hosts: std::ops::RangeInclusive<u32>,
    ) -> Result<u32> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let taken: Vec<u32> = {
            let mut stmt = tx.prepare("SELECT host FROM app_ipv4 WHERE app = ?1")?;
            let own: Option<u32> = stmt.query_row([name.as_str()], |r| r.get(0)).optional()?;
            if let Some(host) = own {
                return Ok(host);
            }
            let mut stmt = tx.prepare("SELECT host FROM app_ipv4 ORDER BY host")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut candidate = *hosts.start();
        for t in &taken {
            if *t == candidate {
                candidate += 1;
            } else if *t > candidate {
                break;
            }
        }
        if !hosts.contains(&candidate) {
            return Err(StoreError::AddressesExhausted(taken.len()));
        }
        tx.execute(
            "INSERT INTO app_ipv4 (app, host) VALUES (?1, ?2)",
            params![name.as_str(), candidate],
        )?;
        tx.commit()?;
        Ok(candidate)
    }

    pub fn ipv4_host(&self, name: &AppName) -> Result<Option<u32>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT host FROM app_ipv4 WHERE app = ?1",
                [name.as_str()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Releases host numbers no recorded app owns (taken by an install that did not finish).
    pub fn release_unowned_ipv4(&self) -> Result<usize> {
        Ok(self.conn().execute(
            "DELETE FROM app_ipv4 WHERE app NOT IN (SELECT name FROM apps)",
            [],
        )?)
    }

    // ---- settings ----

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn delete_setting(&self, key: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM settings WHERE key = ?1", [key])?;
        Ok(())
    }

    /// Sets `key` unless it is set already; returns the value in force.
    pub fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO settings (key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(
            conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })?,
        )
    }

    // ---- history and events ----

    pub fn history(&self, name: &AppName) -> Result<Vec<HistoryEntry>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT at, actor, action, detail FROM history WHERE app = ?1 ORDER BY id")?;
        let rows = stmt
            .query_map([name.as_str()], |r| {
                Ok(HistoryEntry {
                    at: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn add_event(&self, name: &AppName, kind: &str, message: &str) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO events (app, at, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![name.as_str(), now_ms(), kind, message],
        )?;
        conn.execute(
            "DELETE FROM events WHERE app = ?1 AND id <= (SELECT id FROM events WHERE app = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![name.as_str(), EVENTS_KEPT],
        )?;
        Ok(())
    }

    pub fn events(&self, name: &AppName, limit: usize) -> Result<Vec<Event>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, kind, message FROM events WHERE app = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let mut rows = stmt
            .query_map(params![name.as_str(), limit as i64], |r| {
                Ok(Event {
                    at: r.get(0)?,
                    kind: r.get(1)?,
                    message: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.reverse();
        Ok(rows)
    }
}

fn history(conn: &Connection, app: &str, actor: &str, action: &str, detail: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO history (app, at, actor, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![app, now_ms(), actor, action, detail],
    )?;
    Ok(())
}

fn layer_row(r: &rusqlite::Row) -> rusqlite::Result<Result<LayerRow>> {
    let digest_s: String = r.get(1)?;
    let diff_s: Option<String> = r.get(2)?;
    let state: String = r.get(6)?;
    let size: i64 = r.get(4)?;
    let unpacked: i64 = r.get(5)?;
    let id = r.get(0)?;
    let media_type = r.get(3)?;
    Ok((|| {
        Ok(LayerRow {
            id,
            digest: digest("layers.digest", digest_s)?,
            diff_id: diff_s.map(|s| digest("layers.diff_id", s)).transpose()?,
            media_type,
            size: size as u64,
            unpacked_bytes: unpacked as u64,
            ready: state == "ready",
        })
    })())
}

fn image_row(r: &rusqlite::Row) -> rusqlite::Result<Result<ImageRow>> {
    let id = r.get(0)?;
    let d: String = r.get(1)?;
    let c: String = r.get(2)?;
    let config = r.get(3)?;
    let created_at = r.get(4)?;
    Ok((|| {
        Ok(ImageRow {
            id,
            digest: digest("images.digest", d)?,
            config_digest: digest("images.config_digest", c)?,
            config,
            created_at,
        })
    })())
}

fn put_containers(tx: &Connection, app: &AppName, containers: &[ContainerImage]) -> Result<()> {
    for c in containers {
        tx.execute(
            "INSERT INTO app_containers (app, container, image_id, pinned) VALUES (?1, ?2, ?3, ?4)",
            params![app.as_str(), c.container, c.image_id, c.pinned],
        )?;
    }
    Ok(())
}

fn with_containers(conn: &Connection, mut row: AppRow) -> Result<AppRow> {
    let mut stmt = conn.prepare(
        "SELECT container, image_id, pinned FROM app_containers WHERE app = ?1 ORDER BY container",
    )?;
    row.containers = stmt
        .query_map([row.name.as_str()], |r| {
            Ok(ContainerImage {
                container: r.get(0)?,
                image_id: r.get(1)?,
                pinned: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(row)
}

fn get_app_data(conn: &Connection, name: &AppName) -> Result<Option<AppData>> {
    Ok(conn
        .query_row(
            "SELECT db_password, cache_password, id_slot, kept FROM app_data WHERE app = ?1",
            [name.as_str()],
            |r| {
                Ok(AppData {
                    db_password: r.get(0)?,
                    cache_password: r.get(1)?,
                    id_slot: r.get(2)?,
                    kept: r.get(3)?,
                })
            },
        )
        .optional()?)
}

fn app_row(r: &rusqlite::Row) -> rusqlite::Result<Result<AppRow>> {
    let name: String = r.get(0)?;
    let phase: String = r.get(4)?;
    let desired: String = r.get(5)?;
    let manifest = r.get(1)?;
    let image_id = r.get(2)?;
    let pinned = r.get(3)?;
    let created_at = r.get(6)?;
    let updated_at = r.get(7)?;
    Ok((|| {
        Ok(AppRow {
            name: AppName::try_from(name.as_str()).map_err(|_| StoreError::Corrupt {
                what: "apps.name",
                value: name.clone(),
            })?,
            manifest,
            image_id,
            pinned,
            phase: match phase.as_str() {
                "installed" => Phase::Installed,
                "removing" => Phase::Removing,
                _ => {
                    return Err(StoreError::Corrupt {
                        what: "apps.phase",
                        value: phase,
                    })
                }
            },
            desired: Desired::parse(&desired)?,
            created_at,
            updated_at,
            containers: Vec::new(),
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of_bytes(&[n])
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, s)
    }

    fn app(name: &str, image_id: i64) -> AppRow {
        AppRow {
            name: AppName::try_from(name).unwrap(),
            manifest: format!("name = \"{name}\""),
            image_id,
            pinned: "x@sha256:00".into(),
            phase: Phase::Installed,
            desired: Desired::Running,
            created_at: now_ms(),
            updated_at: now_ms(),
            containers: Vec::new(),
        }
    }

    #[test]
    fn container_images_count_as_uses_and_go_with_the_app() {
        let (_d, s) = store();
        let l = s.begin_layer(&d(1), None, "tar", 1).unwrap();
        let main = s
            .insert_image(&d(2), &d(3), b"{}", &[l], "r:1", &d(2))
            .unwrap();
        let worker = s
            .insert_image(&d(4), &d(5), b"{}", &[l], "w:1", &d(4))
            .unwrap();
        let mut row = app("wiki", main);
        row.containers = vec![ContainerImage {
            container: "worker".into(),
            image_id: worker,
            pinned: "w:1@x".into(),
        }];
        s.insert_app(&row, "root", "installed").unwrap();
        let name = AppName::try_from("wiki").unwrap();
        assert_eq!(s.app(&name).unwrap().unwrap().containers, row.containers);
        assert!(
            !s.delete_image_if_unused(worker).unwrap(),
            "used by a container"
        );
        let usage = s.images().unwrap();
        assert_eq!(usage[1].apps, ["wiki"]);
        row.containers.clear();
        s.update_app(&row, "root", "worker gone").unwrap();
        assert!(s.app(&name).unwrap().unwrap().containers.is_empty());
        assert!(s.delete_image_if_unused(worker).unwrap());
    }

    #[test]
    fn app_data_is_made_once_kept_or_found_unowned() {
        let (_d, s) = store();
        let n = |x: &str| AppName::try_from(x).unwrap();
        let mut i = 0;
        let mut pw = || {
            i += 1;
            format!("pw{i}")
        };
        let a = s.app_data_or_insert(&n("a"), 2, &mut pw).unwrap();
        assert_eq!(
            (a.id_slot, a.db_password.as_str(), a.kept),
            (0, "pw1", false)
        );
        assert_eq!(
            s.app_data_or_insert(&n("a"), 2, &mut pw).unwrap(),
            a,
            "stable"
        );
        assert_eq!(
            s.app_data_or_insert(&n("b"), 2, &mut pw).unwrap().id_slot,
            1
        );
        assert!(
            s.app_data_or_insert(&n("c"), 2, &mut pw).is_err(),
            "slots exhausted"
        );
        // Neither was recorded as an app: both are left by unfinished installs, unless kept.
        assert_eq!(s.unowned_app_data().unwrap(), ["a", "b"]);
        s.set_data_kept(&n("a"), true).unwrap();
        assert_eq!(s.unowned_app_data().unwrap(), ["b"]);
        s.delete_app_data(&n("b")).unwrap();
        assert_eq!(
            s.app_data_or_insert(&n("c"), 2, &mut pw).unwrap().id_slot,
            1
        );
    }

    #[test]
    fn reopening_keeps_state_and_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).unwrap();
            let l = s.begin_layer(&d(1), None, "tar", 10).unwrap();
            s.finish_layer(l, 100).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert!(s.layer(&d(1)).unwrap().unwrap().ready);
    }

    #[test]
    fn ipv4_hosts_are_stable_lowest_free_and_released_with_the_app() {
        let (_d, s) = store();
        let n = |x: &str| AppName::try_from(x).unwrap();
        assert_eq!(s.allocate_ipv4(&n("a"), 2..=4).unwrap(), 2);
        assert_eq!(s.allocate_ipv4(&n("b"), 2..=4).unwrap(), 3);
        assert_eq!(s.allocate_ipv4(&n("a"), 2..=4).unwrap(), 2, "stable");
        assert_eq!(s.allocate_ipv4(&n("c"), 2..=4).unwrap(), 4);
        assert!(matches!(
            s.allocate_ipv4(&n("d"), 2..=4),
            Err(StoreError::AddressesExhausted(3))
        ));
        // No app was recorded for any of them: released at start, then free again.
        assert_eq!(s.release_unowned_ipv4().unwrap(), 3);
        let l = s.begin_layer(&d(1), None, "tar", 1).unwrap();
        let img = s
            .insert_image(&d(2), &d(3), b"{}", &[l], "r:1", &d(2))
            .unwrap();
        assert_eq!(s.allocate_ipv4(&n("b"), 2..=4).unwrap(), 2);
        assert_eq!(s.allocate_ipv4(&n("wiki"), 2..=4).unwrap(), 3);
        s.insert_app(&app("wiki", img), "root", "installed")
            .unwrap();
        assert_eq!(s.release_unowned_ipv4().unwrap(), 1, "only b's");
        assert_eq!(s.ipv4_host(&n("wiki")).unwrap(), Some(3));
        s.delete_app(&n("wiki")).unwrap();
        assert_eq!(s.ipv4_host(&n("wiki")).unwrap(), None);
    }

    #[test]
    fn history_is_append_only() {
        let (_d, s) = store();
        let l = s.begin_layer(&d(1), None, "tar", 1).unwrap();
        let img = s
            .insert_image(&d(2), &d(3), b"{}", &[l], "r:1", &d(2))
            .unwrap();
        s.insert_app(&app("wiki", img), "root", "installed")
            .unwrap();
        s.set_desired(
            &AppName::try_from("wiki").unwrap(),
            Desired::Stopped,
            "root",
        )
        .unwrap();
        let conn = s.conn();
        assert!(conn
            .execute("UPDATE history SET actor = 'mallory'", [])
            .is_err());
        assert!(conn.execute("DELETE FROM history", []).is_err());
        drop(conn);
        let h = s.history(&AppName::try_from("wiki").unwrap()).unwrap();
        assert_eq!(
            h.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["install", "stop"]
        );
        assert_eq!(h[1].detail, "desired state running -> stopped");
    }

    #[test]
    fn history_outlives_the_app() {
        let (_d, s) = store();
        let l = s.begin_layer(&d(1), None, "tar", 1).unwrap();
        let img = s
            .insert_image(&d(2), &d(3), b"{}", &[l], "r:1", &d(2))
            .unwrap();
        let name = AppName::try_from("wiki").unwrap();
        s.insert_app(&app("wiki", img), "root", "installed")
            .unwrap();
        s.mark_removing(&name, "root", "rm").unwrap();
        s.delete_app(&name).unwrap();
        assert!(s.app(&name).unwrap().is_none());
        assert_eq!(s.history(&name).unwrap().len(), 2);
    }

    #[test]
    fn orphan_layers_and_image_usage() {
        let (_d, s) = store();
        let a = s.begin_layer(&d(1), None, "tar", 1).unwrap();
        s.finish_layer(a, 1).unwrap();
        let b = s.begin_layer(&d(4), None, "tar", 1).unwrap();
        s.finish_layer(b, 1).unwrap();
        let half = s.begin_layer(&d(5), None, "tar", 1).unwrap();
        let img = s
            .insert_image(&d(2), &d(3), b"{}", &[a], "r:1", &d(2))
            .unwrap();
        let mut orphans = s.orphan_layers().unwrap();
        orphans.sort();
        assert_eq!(orphans, vec![b, half]);
        s.insert_app(&app("one", img), "root", "").unwrap();
        let usage = s.images().unwrap();
        assert_eq!(usage[0].apps, vec!["one".to_string()]);
        assert!(!s.delete_image_if_unused(img).unwrap());
    }

    #[test]
    fn events_are_bounded() {
        let (_d, s) = store();
        let name = AppName::try_from("a").unwrap();
        for i in 0..(EVENTS_KEPT + 20) {
            s.add_event(&name, "exit", &format!("{i}")).unwrap();
        }
        let ev = s.events(&name, 1000).unwrap();
        assert_eq!(ev.len() as i64, EVENTS_KEPT);
        assert_eq!(ev.last().unwrap().message, format!("{}", EVENTS_KEPT + 19));
    }
}
