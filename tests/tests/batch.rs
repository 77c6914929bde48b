//! The poller's batched map reads (`mdsec_agent::datapath::batch`) against aya's
//! entry-by-entry iterator, on a real kernel map larger than one batch.

use std::collections::BTreeMap;

use aya::maps::{HashMap as BpfHashMap, IterableMap};
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    maps as names,
};
use mdsec_tests::kernel::TestProg;

#[test]
fn batched_reads_return_every_entry_once() {
    let mut prog = TestProg::load_with(names::PROGRAM, &[(names::DEVICES, 65_536)]).unwrap();
    let mut map = prog.take_map(names::DEVICES).unwrap();
    let mut devices: BpfHashMap<_, DeviceKey, DeviceValue> = BpfHashMap::try_from(&mut map).unwrap();
    let empty = mdsec_agent::datapath::batch::read_all::<DeviceKey, DeviceValue>(devices.map()).unwrap();
    assert!(empty.is_empty());
    // 40,000 entries: more than two batches of 16,384.
    for i in 0..40_000u32 {
        let k = DeviceKey { ifindex: 1, vlan: (i >> 16) as u16, mac: [2, 0, 0, (i >> 8) as u8, i as u8, 7] };
        devices.insert(k, DeviceValue { packets: i as u64 + 1, ..Default::default() }, 0).unwrap();
    }
    let batched = mdsec_agent::datapath::batch::read_all::<DeviceKey, DeviceValue>(devices.map()).unwrap();
    assert_eq!(batched.len(), 40_000, "every entry, none twice");
    let iterated: BTreeMap<DeviceKey, u64> =
        devices.iter().map(|r| r.unwrap()).map(|(k, v)| (k, v.packets)).collect();
    let batched: BTreeMap<DeviceKey, u64> = batched.into_iter().map(|(k, v)| (k, v.packets)).collect();
    assert_eq!(batched, iterated);
}
