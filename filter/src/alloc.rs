//! The module's memory allocator: free lists of power-of-two blocks (16 bytes to 4 KiB)
//! in front of the system allocator.
//!
//! Why: every request allocates a few short-lived blocks (the stream context, the copy of
//! the request header map Envoy hands over, the `:status` value, the decision's inputs),
//! and wasm32-wasi's system allocator (wasi-libc's dlmalloc) spends about 1,100
//! instructions on each allocation (measured with `make bench-costs`). Taking a block from
//! a free list, or giving it back, costs a few dozen.
//!
//! The price is memory: a block is rounded up to a power of two, and freed blocks stay in
//! their list instead of going back to the system allocator, so a VM keeps what it once
//! used at the same time (per size) — for a stream's small blocks, a few KiB. Blocks
//! larger than 4 KiB (shadow copies' bodies) and over-aligned ones go straight to the
//! system allocator, as before.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// The smallest block is 2⁴ = 16 bytes: room for the free-list link, and for every
/// alignment Rust asks for on wasm32 up to 16.
const MIN_SHIFT: u32 = 4;

/// Size classes: 16, 32, … 4096 bytes.
const CLASSES: usize = 9;

/// The largest block served from the lists.
const MAX_BLOCK: usize = 1 << (MIN_SHIFT as usize + CLASSES - 1);

/// Blocks are aligned to this (and requests aligned beyond it bypass the lists).
const BLOCK_ALIGN: usize = 16;

/// The free lists: per size class, the first free block, whose first word links to the
/// next one (null ends the list).
pub struct Pools {
    heads: UnsafeCell<[*mut u8; CLASSES]>,
}

// SAFETY: a proxy-wasm VM is single-threaded (wasm32 without the threads proposal), so
// the lists are never reached from two threads; natively, only the unit tests use a
// `Pools`, each its own, from one thread.
unsafe impl Sync for Pools {}

impl Pools {
    /// Empty lists: every first allocation of a class comes from the system allocator.
    pub const fn new() -> Pools {
        Pools {
            heads: UnsafeCell::new([ptr::null_mut(); CLASSES]),
        }
    }
}

/// The size class serving `layout`, or `None` for the system allocator.
fn class(layout: Layout) -> Option<usize> {
    if layout.align() > BLOCK_ALIGN || layout.size() > MAX_BLOCK {
        return None;
    }
    // ⌈log₂ size⌉, then counted from the smallest class.
    let size = layout.size().max(1);
    let shift = usize::BITS - (size - 1).leading_zeros();
    Some(shift.saturating_sub(MIN_SHIFT) as usize)
}

/// The block a class hands out.
fn block(class: usize) -> Layout {
    // SAFETY: the size (16 … 4096) is a multiple of the alignment, which is a power of
    // two, and far from overflowing.
    unsafe { Layout::from_size_align_unchecked(1 << (MIN_SHIFT as usize + class), BLOCK_ALIGN) }
}

// SAFETY: every block handed out is at least `layout.size()` bytes and `BLOCK_ALIGN`
// aligned (≥ `layout.align()`), and belongs to the caller until it is given back; a block
// given back goes to the list of the class its layout maps to, which is the class it was
// allocated from (Rust passes back the layout it allocated with).
unsafe impl GlobalAlloc for Pools {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let class = match class(layout) {
            Some(class) => class,
            None => return System.alloc(layout),
        };
        let heads = &mut *self.heads.get();
        let head = heads[class];
        if head.is_null() {
            return System.alloc(block(class));
        }
        heads[class] = *(head as *mut *mut u8);
        head
    }

    unsafe fn dealloc(&self, block_ptr: *mut u8, layout: Layout) {
        let class = match class(layout) {
            Some(class) => class,
            None => return System.dealloc(block_ptr, layout),
        };
        let heads = &mut *self.heads.get();
        *(block_ptr as *mut *mut u8) = heads[class];
        heads[class] = block_ptr;
    }

    unsafe fn realloc(&self, old: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (class(layout), class(new_layout)) {
            // The block already has room (the class is its capacity).
            (Some(before), Some(after)) if before == after => old,
            (None, None) => System.realloc(old, layout, new_size),
            _ => {
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    ptr::copy_nonoverlapping(old, new, layout.size().min(new_size));
                    self.dealloc(old, layout);
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn sizes_map_to_the_smallest_class_that_holds_them() {
        assert_eq!(class(layout(0, 1)), Some(0));
        assert_eq!(class(layout(1, 1)), Some(0));
        assert_eq!(class(layout(16, 8)), Some(0));
        assert_eq!(class(layout(17, 1)), Some(1));
        assert_eq!(class(layout(400, 4)), Some(5));
        assert_eq!(class(layout(4096, 16)), Some(8));
        assert_eq!(class(layout(4097, 1)), None);
        assert_eq!(class(layout(8, 32)), None);
        for size in 1..=MAX_BLOCK {
            let c = class(layout(size, 1)).unwrap();
            assert!(block(c).size() >= size, "{size} bytes got a smaller block");
            assert!(
                c == 0 || block(c - 1).size() < size,
                "{size} bytes: not the smallest"
            );
        }
    }

    #[test]
    fn a_freed_block_is_reused_and_keeps_its_contents_apart() {
        let pools = Pools::new();
        unsafe {
            let a = pools.alloc(layout(24, 8));
            let b = pools.alloc(layout(30, 4));
            assert!(!a.is_null() && !b.is_null() && a != b);
            assert_eq!(a as usize % BLOCK_ALIGN, 0);
            ptr::write_bytes(a, 0xaa, 24);
            ptr::write_bytes(b, 0xbb, 30);
            pools.dealloc(a, layout(24, 8));
            // Same class (32 bytes): the block just freed comes back first.
            let c = pools.alloc(layout(20, 1));
            assert_eq!(c, a);
            assert_eq!(*b.add(29), 0xbb);
            pools.dealloc(b, layout(30, 4));
            pools.dealloc(c, layout(20, 1));
        }
    }

    #[test]
    fn realloc_keeps_the_data_across_classes_and_to_the_system_allocator() {
        let pools = Pools::new();
        unsafe {
            let small = pools.alloc(layout(10, 1));
            for i in 0..10 {
                *small.add(i) = i as u8;
            }
            let same = pools.realloc(small, layout(10, 1), 16);
            assert_eq!(same, small, "16 bytes still fit the block");
            let grown = pools.realloc(same, layout(16, 1), 100);
            let huge = pools.realloc(grown, layout(100, 1), 10_000);
            let back = pools.realloc(huge, layout(10_000, 1), 50);
            for i in 0..10 {
                assert_eq!(*back.add(i), i as u8);
            }
            pools.dealloc(back, layout(50, 1));
        }
    }
}
