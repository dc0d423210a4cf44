//! The control plane's identity root across deployments old and new: a new database gets a
//! random root (not the server key), kept sealed and the same on every start; a database whose
//! nodes were endorsed under a server key before roots were stored keeps that identity, found by
//! checking the endorsements; a key that fits neither is refused before anything is stored.

use pond_core::server_keys::{identity_root, AtRestKeys};
use pond_core::store::Store;
use pond_store::MemoryStore;

fn signer_endorsed_by(identity: &[u8; 32]) -> String {
    let node_key = pond_core::keys::ed25519_public(&[7u8; 32]);
    let b64 = |k: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, k);
    serde_json::json!({
        "node_id": "node-old",
        "signing_key": b64(&node_key),
        "fingerprint": pond_core::attest::fingerprint(&node_key),
        "endorsement": pond_core::keys::endorse(identity, "node", "node-old", &node_key),
    })
    .to_string()
}

#[tokio::test]
async fn a_new_deployment_gets_a_random_root_that_stays() {
    let store = MemoryStore::new();
    let key = [1u8; 32];
    let root = identity_root(&store, &AtRestKeys::new(key, &[]), |_| Ok(())).await.unwrap();
    assert_ne!(root, key, "the root is not the server key");
    assert_eq!(
        identity_root(&store, &AtRestKeys::new(key, &[]), |_| Ok(())).await.unwrap(),
        root,
        "the same on every start"
    );
    let rotated = AtRestKeys::new([2u8; 32], &[key]);
    assert_eq!(identity_root(&store, &rotated, |_| Ok(())).await.unwrap(), root, "a rotation keeps it");
    let foreign = identity_root(&store, &AtRestKeys::new([3u8; 32], &[]), |_| Ok(())).await.unwrap_err().to_string();
    assert!(foreign.contains("does not open this database's sealed identity"), "{foreign}");
}

#[tokio::test]
async fn an_older_deployment_keeps_the_identity_its_nodes_were_endorsed_under() {
    let old_key = [4u8; 32];
    let store = MemoryStore::new();
    store.put_record("log_signer", "node-old", &signer_endorsed_by(&old_key)).await.unwrap();
    // A node given another deployment's key is refused, and stores nothing.
    let wrong = identity_root(&store, &AtRestKeys::new([5u8; 32], &[]), |_| Ok(())).await.unwrap_err().to_string();
    assert!(wrong.contains("not the one this database's nodes were endorsed under"), "{wrong}");
    assert!(store.get_record("server-identity", "root").await.unwrap().is_none());
    // Mid-rotation (the old key as a previous one), the endorsed key is the root.
    let root = identity_root(&store, &AtRestKeys::new([6u8; 32], &[old_key]), |_| Ok(())).await.unwrap();
    assert_eq!(root, old_key);
}

#[tokio::test]
async fn a_node_starting_beside_another_takes_the_identity_that_node_stored() {
    // Nodes A and B start together on a new database with the same key: B found no identity,
    // then A stored its random root and endorsed its signing key under it. B, looking for a
    // root to store, meets that endorsement: it takes A's root, not a refusal of its own key.
    let store = MemoryStore::new();
    let keys = AtRestKeys::new([8u8; 32], &[]);
    let root_of_a = identity_root(&store, &keys, |_| Ok(())).await.unwrap();
    store.put_record("log_signer", "node-old", &signer_endorsed_by(&root_of_a)).await.unwrap();
    assert_eq!(pond_core::server_keys::first_root(&store, &keys).await.unwrap(), root_of_a);
}
