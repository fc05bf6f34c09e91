//! The PostgreSQL sink (cargo feature `postgres`, on by default).

use crate::{ExportRow, Sink, WriteError};
use std::sync::Arc;
use tracing::warn;
/// PostgreSQL: one table, upserted with `INSERT … ON CONFLICT DO UPDATE` keyed by
/// (category, entity, bucket_ms, bucket_start). A row is only replaced by one counting at
/// least as many records (totals only grow as batches arrive), so a node that is behind
/// cannot set a row back.
pub struct Postgres {
    url: String,
    /// TLS unless the URL says `sslmode=disable`.
    tls: Option<crate::pgtls::MakeRustls>,
    table: String,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// Connects, and drives the connection on a task of its own until it ends.
async fn connect_with<T>(url: &str, tls: T) -> Result<tokio_postgres::Client, String>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, conn) = tokio_postgres::connect(url, tls)
        .await
        .map_err(|e| format!("connecting: {}", causes(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            warn!("postgres connection ended: {e}");
        }
    });
    Ok(client)
}

/// An error with its causes, `outer: inner: …` (tokio-postgres says "error performing TLS
/// handshake" and keeps the reason, an unknown issuer say, in the source).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

impl Postgres {
    /// A sink writing to `table` (a plain SQL identifier) of the database at `url`
    /// (`postgresql://user[:password]@host:port/db[?sslmode=disable|prefer|require]`); it
    /// connects at the first write. With `ca` (PEM root certificates) the server's
    /// certificate is verified, chain and host name; without, TLS only encrypts.
    pub fn new(url: &str, table: &str, ca: Option<&std::path::Path>) -> Result<Postgres, String> {
        let ok = table
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && table.len() <= 63
            && table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!(
                "export_table {table:?}: letters, digits and _ only, not starting with a digit"
            ));
        }
        let parsed = url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| format!("export_postgres_url: {e}"))?;
        let plain = parsed.get_ssl_mode() == tokio_postgres::config::SslMode::Disable;
        let roots = match ca {
            None => None,
            Some(_) if plain => {
                return Err(
                    "export_postgres_ca is set but export_postgres_url says sslmode=disable".into(),
                )
            }
            Some(path) => {
                use rustls::pki_types::{pem::PemObject, CertificateDer};
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("export_postgres_ca {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!(
                        "export_postgres_ca {}: no certificate in it",
                        path.display()
                    ));
                }
                Some(certs)
            }
        };
        let tls = if plain {
            None
        } else {
            let config = edgetally_net::tls::tcp_client_config_roots(roots)
                .map_err(|e| format!("export_postgres_ca: {e}"))?;
            Some(crate::pgtls::MakeRustls(Arc::new(config)))
        };
        Ok(Postgres {
            url: url.to_string(),
            tls,
            table: table.to_string(),
            client: tokio::sync::Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, String> {
        let client = match &self.tls {
            None => connect_with(&self.url, tokio_postgres::NoTls).await?,
            Some(tls) => connect_with(&self.url, tls.clone()).await?,
        };
        let t = &self.table;
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    category text NOT NULL,
                    entity text NOT NULL,
                    bucket_start timestamptz NOT NULL,
                    bucket_ms integer NOT NULL,
                    count numeric(20, 0) NOT NULL,
                    sum numeric NOT NULL,
                    min double precision NOT NULL,
                    max double precision NOT NULL,
                    exported_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (category, entity, bucket_ms, bucket_start)
                );
                ALTER TABLE {t} ADD COLUMN IF NOT EXISTS distinct_estimate double precision,
                    ADD COLUMN IF NOT EXISTS p50 double precision,
                    ADD COLUMN IF NOT EXISTS p90 double precision,
                    ADD COLUMN IF NOT EXISTS p99 double precision,
                    ADD COLUMN IF NOT EXISTS distinct_sketch bytea,
                    ADD COLUMN IF NOT EXISTS quantile_sketch bytea"
            ))
            .await
            .map_err(|e| format!("creating {t}: {e}"))?;
        Ok(client)
    }
}

impl Sink for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn prepare(&self) -> Result<(), String> {
        let mut guard = self.client.lock().await;
        *guard = Some(self.connect().await?);
        Ok(())
    }

    async fn write(&self, rows: &[ExportRow]) -> Result<(), WriteError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(self.connect().await.map_err(WriteError::Unavailable)?);
        }
        let Some(client) = guard.as_ref() else {
            return Err(WriteError::Unavailable("not connected".into()));
        };
        // One array per column: the rows go in as one statement (`unnest`).
        let categories: Vec<&str> = rows.iter().map(|r| r.category.as_str()).collect();
        let entities: Vec<&str> = rows
            .iter()
            .map(|r| r.entity.as_deref().unwrap_or(""))
            .collect();
        let starts: Vec<i64> = rows.iter().map(|r| r.bucket_start_ms).collect();
        let widths: Vec<i32> = rows
            .iter()
            .map(|r| i32::try_from(r.bucket_ms).unwrap_or(i32::MAX))
            .collect();
        let counts: Vec<String> = rows.iter().map(|r| r.total.count.to_string()).collect();
        let sums: Vec<String> = rows.iter().map(|r| r.total.sum.to_decimal()).collect();
        let mins: Vec<f64> = rows.iter().map(|r| r.total.min).collect();
        let maxs: Vec<f64> = rows.iter().map(|r| r.total.max).collect();
        let sk = SketchColumns::of(rows);
        let sql = upsert_sql(&self.table);
        let result = client
            .execute(
                &sql,
                &[
                    &categories,
                    &entities,
                    &starts,
                    &widths,
                    &counts,
                    &sums,
                    &mins,
                    &maxs,
                    &sk.distinct,
                    &sk.p50,
                    &sk.p90,
                    &sk.p99,
                    &sk.distinct_bytes,
                    &sk.quantile_bytes,
                ],
            )
            .await;
        result.map(drop).map_err(|e| {
            if e.as_db_error().is_none() {
                // Reconnect next time (the server may have restarted).
                *guard = None;
            }
            upsert_error(&e)
        })
    }
}

/// What a failed upsert means: what the rows hold (a data exception, class 22, such as
/// U+0000 in text; an integrity constraint, class 23, such as a CHECK the table's owner
/// added) is refused again on every try; anything else may pass later.
fn upsert_error(e: &tokio_postgres::Error) -> WriteError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let why = format!("upsert: {} (SQLSTATE {code})", db.message());
        if code.starts_with("22") || code.starts_with("23") {
            return WriteError::Refused(why);
        }
        return WriteError::Unavailable(why);
    }
    WriteError::Unavailable(format!("upsert: {}", causes(e)))
}

/// The upsert of one chunk of rows into table `t`: unnest's arrays in `write`'s order; a row
/// replaced only by one counting at least as many records, and only if something changed.
fn upsert_sql(t: &str) -> String {
    // A row's sketch columns are never set back to NULL: sketches are kept shorter than
    // totals (`retention_sketch_minutes_ms`), and a rescan re-exporting an older bucket
    // must not erase what was exported while they were there.
    format!(
        "INSERT INTO {t} (category, entity, bucket_start, bucket_ms, count, sum, min, max,
                          distinct_estimate, p50, p90, p99, distinct_sketch, quantile_sketch)
         SELECT c, e, 'epoch'::timestamptz + b * interval '1 millisecond', w, n::numeric,
                s::numeric, lo, hi, d, q50, q90, q99, ds, qs
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::int4[], $5::text[], $6::text[],
                     $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[],
                     $12::float8[], $13::bytea[], $14::bytea[])
              AS r(c, e, b, w, n, s, lo, hi, d, q50, q90, q99, ds, qs)
         ON CONFLICT (category, entity, bucket_ms, bucket_start) DO UPDATE
         SET count = EXCLUDED.count, sum = EXCLUDED.sum, min = EXCLUDED.min,
             max = EXCLUDED.max, exported_at = now(),
             distinct_estimate = COALESCE(EXCLUDED.distinct_estimate, {t}.distinct_estimate),
             p50 = COALESCE(EXCLUDED.p50, {t}.p50), p90 = COALESCE(EXCLUDED.p90, {t}.p90),
             p99 = COALESCE(EXCLUDED.p99, {t}.p99),
             distinct_sketch = COALESCE(EXCLUDED.distinct_sketch, {t}.distinct_sketch),
             quantile_sketch = COALESCE(EXCLUDED.quantile_sketch, {t}.quantile_sketch)
         WHERE EXCLUDED.count >= {t}.count
           AND (EXCLUDED.count, EXCLUDED.sum, EXCLUDED.min, EXCLUDED.max,
                EXCLUDED.distinct_sketch, EXCLUDED.quantile_sketch)
               IS DISTINCT FROM ({t}.count, {t}.sum, {t}.min, {t}.max,
                COALESCE(EXCLUDED.distinct_sketch, {t}.distinct_sketch),
                COALESCE(EXCLUDED.quantile_sketch, {t}.quantile_sketch))"
    )
}

/// The sketch columns of a chunk of rows, one array each: the distinct estimate, p50, p90 and
/// p99 (NULL without the sketch), and the sketches' canonical bytes (docs/PROTOCOL.md §10).
struct SketchColumns {
    distinct: Vec<Option<f64>>,
    p50: Vec<Option<f64>>,
    p90: Vec<Option<f64>>,
    p99: Vec<Option<f64>>,
    distinct_bytes: Vec<Option<Vec<u8>>>,
    quantile_bytes: Vec<Option<Vec<u8>>>,
}

impl SketchColumns {
    fn of(rows: &[ExportRow]) -> SketchColumns {
        fn hll(r: &ExportRow) -> Option<&edgetally_core::sketches::Hll> {
            r.sketches.as_ref().and_then(|k| k.distinct.as_ref())
        }
        fn q(r: &ExportRow) -> Option<&edgetally_core::sketches::Quantiles> {
            r.sketches.as_ref().and_then(|k| k.quantiles.as_ref())
        }
        let at = |p: f64| -> Vec<Option<f64>> {
            rows.iter()
                .map(|r| q(r).and_then(|q| q.quantile(p)))
                .collect()
        };
        SketchColumns {
            distinct: rows
                .iter()
                .map(|r| hll(r).map(|h| h.estimate().round()))
                .collect(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            distinct_bytes: rows.iter().map(|r| hll(r).map(|h| h.encode())).collect(),
            quantile_bytes: rows.iter().map(|r| q(r).map(|q| q.encode())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Postgres;

    #[test]
    fn a_ca_needs_tls_and_a_readable_certificate() {
        let url = "postgresql://u@127.0.0.1:5432/db";
        assert!(Postgres::new(url, "t", None).is_ok_and(|p| p.tls.is_some()));
        let plain = format!("{url}?sslmode=disable");
        assert!(Postgres::new(&plain, "t", None).is_ok_and(|p| p.tls.is_none()));
        let dir = std::env::temp_dir().join(format!("et-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = |u: &str, ca: &std::path::Path| Postgres::new(u, "t", Some(ca)).err();
        assert!(err(&plain, &empty).is_some_and(|e| e.contains("sslmode=disable")));
        assert!(err(url, &empty).is_some_and(|e| e.contains("no certificate")));
        assert!(err(url, &dir.join("missing.pem")).is_some_and(|e| e.contains("missing.pem")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
