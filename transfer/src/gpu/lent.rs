//! GPU memory an engine lends us: vLLM's per-layer KV tensors, which
//! PyTorch's caching allocator carves out of `cudaMalloc` allocations. Owns
//! the regions' device addresses ([`RegionMap`]) and the table of CUDA
//! allocations behind them ([`AllocationTable`]: one `cuMemGetAddressRange`
//! per region, each allocation once), which cuda-ipc exports handle by
//! handle. Never frees the memory.
//!
//! Memory the table cannot describe (a region over several VMM mappings, as
//! PyTorch's expandable segments make) is still lent: NIXL registers it by
//! address, and only cuda-ipc, which needs the allocations, refuses it.
//!
//! The table is pure (built from a lookup, tested without a GPU); only
//! [`LentGpu::new`] asks the driver.

use std::sync::Arc;

use super::Gpu;
use crate::error::TransferError;
use crate::memory::RegionMap;

/// Where each region of a pool lies in the CUDA allocations that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationTable {
    region_len: u64,
    /// (base, size) of each allocation, in the order regions first use them.
    allocs: Vec<(u64, u64)>,
    /// Per region: (index into `allocs`, offset of the region in it).
    regions: Vec<(u32, u64)>,
}

impl AllocationTable {
    /// The table of regions of `region_len` bytes at `bases`; `lookup`
    /// returns the allocation (base, size) holding an address
    /// (`cuMemGetAddressRange`). Allocations holding several regions appear
    /// once.
    pub fn build(
        bases: &[u64],
        region_len: u64,
        mut lookup: impl FnMut(u64) -> Result<(u64, u64), TransferError>,
    ) -> Result<AllocationTable, TransferError> {
        let mut allocs: Vec<(u64, u64)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        let mut regions = Vec::with_capacity(bases.len());
        for (r, &b) in bases.iter().enumerate() {
            let (abase, asize) = lookup(b).map_err(|e| match e {
                TransferError::Gpu(m) => TransferError::Gpu(format!("region {r}: {m}")),
                e => e,
            })?;
            let inside = b >= abase
                && (b - abase)
                    .checked_add(region_len)
                    .is_some_and(|end| end <= asize);
            if !inside {
                return Err(TransferError::BadRequest(format!(
                    "region {r} ({region_len} bytes at {b:#x}) does not fit in its CUDA \
                     allocation ({asize} bytes at {abase:#x}): is the layout the tensors' shape?"
                )));
            }
            let i = *index.entry(abase).or_insert_with(|| {
                allocs.push((abase, asize));
                allocs.len() - 1
            });
            if allocs[i].1 != asize {
                return Err(TransferError::Gpu(format!(
                    "the driver reports two sizes for the allocation at {abase:#x}"
                )));
            }
            regions.push((i as u32, b - abase));
        }
        AllocationTable::from_parts(region_len, allocs, regions)
    }

    /// A table as a peer described it: every region inside its allocation,
    /// every allocation used.
    pub fn from_parts(
        region_len: u64,
        allocs: Vec<(u64, u64)>,
        regions: Vec<(u32, u64)>,
    ) -> Result<AllocationTable, TransferError> {
        if regions.is_empty() || region_len == 0 {
            return Err(TransferError::BadMetadata(
                "an allocation table needs at least one region of at least one byte".into(),
            ));
        }
        let mut used = vec![false; allocs.len()];
        for (r, &(a, off)) in regions.iter().enumerate() {
            let size = allocs.get(a as usize).map(|x| x.1).ok_or_else(|| {
                TransferError::BadMetadata(format!(
                    "region {r} names allocation {a} of {}",
                    allocs.len()
                ))
            })?;
            if off.checked_add(region_len).is_none_or(|end| end > size) {
                return Err(TransferError::BadMetadata(format!(
                    "region {r} ({region_len} bytes at offset {off}) overruns allocation {a} \
                     of {size} bytes"
                )));
            }
            used[a as usize] = true;
        }
        if let Some(a) = used.iter().position(|u| !u) {
            return Err(TransferError::BadMetadata(format!(
                "allocation {a} holds no region"
            )));
        }
        Ok(AllocationTable {
            region_len,
            allocs,
            regions,
        })
    }

    pub fn region_len(&self) -> u64 {
        self.region_len
    }

    pub fn allocs(&self) -> &[(u64, u64)] {
        &self.allocs
    }

    pub fn regions(&self) -> &[(u32, u64)] {
        &self.regions
    }

    /// Whether the pool is one range: every region in one allocation, each
    /// right after the one before.
    pub fn is_one_range(&self) -> bool {
        self.allocs.len() == 1
            && self
                .regions
                .windows(2)
                .all(|w| w[0].1.checked_add(self.region_len) == Some(w[1].1))
    }

    /// The regions where allocation `i` is mapped at `mapped[i]` (the
    /// exporter's own addresses, or where this process opened them).
    pub fn region_map(&self, mapped: &[u64]) -> Result<RegionMap, TransferError> {
        if mapped.len() != self.allocs.len() {
            return Err(TransferError::BadMetadata(format!(
                "{} allocations mapped, the table has {}",
                mapped.len(),
                self.allocs.len()
            )));
        }
        let bases = self
            .regions
            .iter()
            .map(|&(a, off)| mapped[a as usize].checked_add(off))
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| TransferError::BadMetadata("a region wraps the address space".into()))?;
        RegionMap::new(bases, self.region_len)
            .map_err(|e| TransferError::BadMetadata(format!("the allocation table: {e}")))
    }
}

/// An engine's GPU memory: regions on one device, not freed on drop.
pub struct LentGpu {
    gpu: Arc<Gpu>,
    regions: RegionMap,
    /// The allocations behind the regions, or why they could not be told.
    table: Result<AllocationTable, String>,
    /// The regions are not (known to be) one range of one allocation.
    separate: bool,
    /// Allocations this process made for the regions (benchmarks), freed
    /// after everything else here.
    _backing: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl LentGpu {
    /// The regions `map` describes, which must be device memory of `gpu`
    /// (their first and last bytes are checked): contiguous regions inside
    /// one allocation are one range, anything else is separate regions (no
    /// range may cross one).
    ///
    /// # Safety
    /// Every region must be device memory of `gpu` that outlives this value
    /// and every transfer into or out of it.
    pub unsafe fn new(gpu: &Arc<Gpu>, map: RegionMap) -> Result<LentGpu, TransferError> {
        let len = map.region_len();
        for (r, &b) in map.bases().iter().enumerate() {
            for p in [b, b + (len - 1)] {
                gpu.check_device_ptr(p).map_err(|e| match e {
                    TransferError::Gpu(m) => {
                        TransferError::Gpu(format!("region {r} ({len} bytes at {b:#x}): {m}"))
                    }
                    e => e,
                })?;
            }
        }
        let table = AllocationTable::build(map.bases(), len, |p| gpu.allocation_of(p))
            .map_err(|e| e.to_string());
        if let Err(why) = &table {
            tracing::info!(%why, "lent GPU memory without an allocation table: cuda-ipc cannot export it");
        }
        Ok(LentGpu {
            gpu: gpu.clone(),
            separate: table.as_ref().map_or(true, |t| !t.is_one_range()),
            regions: map,
            table,
            _backing: None,
        })
    }

    /// Like [`LentGpu::new`], keeping `backing` (what holds the regions)
    /// alive as long as this value.
    ///
    /// # Safety
    /// As [`LentGpu::new`], with `backing` owning the regions.
    pub unsafe fn backed_by(
        gpu: &Arc<Gpu>,
        map: RegionMap,
        backing: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<LentGpu, TransferError> {
        let mut m = LentGpu::new(gpu, map)?;
        m._backing = Some(backing);
        Ok(m)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The first region's address (the pool's base when it is one range).
    pub fn addr(&self) -> u64 {
        self.regions.bases()[0]
    }

    pub fn len(&self) -> u64 {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The allocations behind the regions.
    pub fn table(&self) -> Result<&AllocationTable, TransferError> {
        self.table
            .as_ref()
            .map_err(|why| TransferError::Gpu(format!("the regions' CUDA allocations: {why}")))
    }

    /// The regions, when they are separate (None: one range at `addr`).
    pub fn region_map(&self) -> Option<&RegionMap> {
        self.separate.then_some(&self.regions)
    }

    /// The device address of pool bytes `[offset, offset + len)`; None out
    /// of range or, with separate regions, across a region's end.
    pub fn resolve(&self, offset: u64, len: u64) -> Option<u64> {
        if self.separate {
            return self.regions.resolve(offset, len);
        }
        (offset.checked_add(len)? <= self.len()).then(|| self.addr() + offset)
    }

    /// The address ranges of the pool: one, or one per region.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        match self.region_map() {
            Some(m) => m.bases().iter().map(|&b| (b, m.region_len())).collect(),
            None => vec![(self.addr(), self.len())],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocations as the driver would report them: (base, size).
    fn lookup(allocs: &[(u64, u64)]) -> impl FnMut(u64) -> Result<(u64, u64), TransferError> + '_ {
        move |p| {
            allocs
                .iter()
                .copied()
                .find(|&(b, s)| p >= b && p < b + s)
                .ok_or_else(|| TransferError::Gpu("CUDA_ERROR_NOT_FOUND".into()))
        }
    }

    #[test]
    fn allocations_shared_by_regions_appear_once_in_first_use_order() {
        // PyTorch's caching allocator: layers 0 and 2 in one segment, 1 in another.
        let allocs = [(0x10_0000, 0x4000), (0x80_0000, 0x2000)];
        let bases = [0x10_1000, 0x80_0000, 0x10_3000, 0x80_1000];
        let mut calls = 0;
        let mut look = lookup(&allocs);
        let t = AllocationTable::build(&bases, 0x1000, |p| {
            calls += 1;
            look(p)
        })
        .unwrap();
        assert_eq!(calls, 4, "one lookup per region");
        assert_eq!(t.allocs(), &allocs);
        assert_eq!(
            t.regions(),
            &[(0, 0x1000), (1, 0), (0, 0x3000), (1, 0x1000)]
        );
        assert!(!t.is_one_range());
        // The exporter's own addresses come back; opened elsewhere, they move with the mapping.
        assert_eq!(
            t.region_map(&[0x10_0000, 0x80_0000]).unwrap().bases(),
            &bases
        );
        let there = t.region_map(&[0x7000_0000, 0x9000_0000]).unwrap();
        assert_eq!(
            there.bases(),
            &[0x7000_1000, 0x9000_0000, 0x7000_3000, 0x9000_1000]
        );
        assert_eq!(there.resolve(0x2000 + 8, 16), Some(0x7000_3008));
        assert!(t.region_map(&[0x7000_0000]).is_err());
    }

    #[test]
    fn one_allocation_holding_contiguous_regions_is_one_range() {
        let allocs = [(0x10_0000, 0x10_0000)];
        let t = AllocationTable::build(&[0x10_0200, 0x10_0600, 0x10_0a00], 0x400, lookup(&allocs))
            .unwrap();
        assert!(t.is_one_range());
        assert_eq!(t.regions(), &[(0, 0x200), (0, 0x600), (0, 0xa00)]);
        // Contiguous addresses over two allocations are not: an importer maps
        // each allocation somewhere else.
        let two = [(0x10_0000, 0x400), (0x10_0400, 0x400)];
        let t = AllocationTable::build(&[0x10_0000, 0x10_0400], 0x400, lookup(&two)).unwrap();
        assert_eq!(t.allocs().len(), 2);
        assert!(!t.is_one_range());
        // Neither are regions of one allocation out of order.
        let t = AllocationTable::build(&[0x10_0400, 0x10_0000], 0x400, lookup(&allocs)).unwrap();
        assert!(!t.is_one_range());
    }

    #[test]
    fn regions_outside_their_allocation_or_unknown_addresses_are_refused() {
        let allocs = [(0x10_0000, 0x1000)];
        let err = AllocationTable::build(&[0x10_0800], 0x1000, lookup(&allocs)).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err =
            AllocationTable::build(&[0x10_0000, 0x20_0000], 0x100, lookup(&allocs)).unwrap_err();
        assert!(
            err.to_string().contains("region 1") && err.to_string().contains("NOT_FOUND"),
            "{err}"
        );
    }

    #[test]
    fn a_peers_table_is_checked() {
        let ok = AllocationTable::from_parts(16, vec![(0x1000, 64)], vec![(0, 0), (0, 48)]);
        assert!(ok.is_ok());
        for (allocs, regions) in [
            (vec![(0x1000, 64)], vec![]),
            (vec![(0x1000, 64)], vec![(1, 0)]),
            (vec![(0x1000, 64)], vec![(0, 49)]),
            (vec![(0x1000, 64)], vec![(0, u64::MAX)]),
            (vec![(0x1000, 64), (0x2000, 64)], vec![(0, 0)]),
        ] {
            assert!(
                AllocationTable::from_parts(16, allocs.clone(), regions.clone()).is_err(),
                "{allocs:?} {regions:?}"
            );
        }
        // Overlapping regions once mapped are refused as a region map.
        let t = AllocationTable::from_parts(32, vec![(0x1000, 64)], vec![(0, 0), (0, 16)]).unwrap();
        assert!(t.region_map(&[0x5000]).is_err());
    }
}
