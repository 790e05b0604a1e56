//! Test databases of both backends: a SQLite file in a temp dir, or a throwaway PostgreSQL cluster (Debian's
//! `postgresql` package) started for the test and stopped and deleted when it ends, failed or not.
//! [`backend_tests!`] writes a test body once and runs it on each: the SQLite test always, the PostgreSQL
//! one `#[ignore = "needs postgresql …"]` (the test script runs ignored tests; without PostgreSQL it fails
//! with a message saying what is missing, it does not pass).

use super::pg_cluster::{Durability, PgCluster};
use super::{Location, Store};

/// A database for one test; dropping it deletes the SQLite file or stops and deletes the cluster.
pub(crate) struct TestDb {
    pub store: Store,
    pub location: Location,
    _cluster: Option<PgCluster>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub(crate) async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let location = Location::Sqlite(dir.path().join("test.db"));
        let store = Store::open(&location).await.unwrap();
        Self { store, location, _cluster: None, _dir: dir }
    }

    pub(crate) async fn postgres() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = PgCluster::start(dir.path(), Durability::None).unwrap();
        let location = Location::Postgres(cluster.url("postgres"));
        let store = Store::open(&location).await.unwrap();
        Self { store, location, _cluster: Some(cluster), _dir: dir }
    }

    /// A second, independent handle on the same database (another daemon, or this one restarted).
    pub(crate) async fn reopen(&self) -> Store {
        Store::open(&self.location).await.unwrap()
    }
}

/// Writes each test once and runs it on both backends:
/// `backend_tests! { async fn name(store, db) { … } }` makes `name::sqlite` and `name::postgres` (ignored:
/// it needs PostgreSQL). `db` is the [`TestDb`], for tests that reopen the database.
macro_rules! backend_tests {
    ($(async fn $name:ident($store:ident, $db:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                #[allow(unused_variables)]
                async fn body($store: crate::store::Store, $db: &crate::store::testing::TestDb) $body

                #[tokio::test]
                async fn sqlite() {
                    let db = crate::store::testing::TestDb::sqlite().await;
                    body(db.store.clone(), &db).await;
                }

                #[tokio::test]
                #[ignore = "needs postgresql: starts a throwaway cluster with Debian's postgresql package"]
                async fn postgres() {
                    let db = crate::store::testing::TestDb::postgres().await;
                    body(db.store.clone(), &db).await;
                    db.store.close().await;
                }
            }
        )*
    };
}
pub(crate) use backend_tests;
