//! The two FP8 formats of OCP's 8-bit floating point specification (and of NVIDIA's
//! `__nv_fp8_e4m3` / `__nv_fp8_e5m2`), converted from f32 exactly as CUDA's
//! `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, …)` converts them:
//!
//! - round to nearest, ties to even, including into the subnormal range;
//! - saturating: a value whose rounding would exceed the largest finite code (infinities
//!   included) becomes that code, with the input's sign;
//! - NaN becomes `0x7F` whatever its sign (E4M3's only NaN; a quiet NaN in E5M2), as CUDA's
//!   host conversion canonicalizes it;
//! - the sign of zero and of values that underflow to zero is kept (`-0.0` → `0x80`).
//!
//! Decoding is exact: every code is an f32.

/// An 8-bit float format: E4M3 (finite only, max 448) or E5M2 (with infinities, max 57344).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    E4m3,
    E5m2,
}

impl Fp8Format {
    /// The FP8 format a policy format is, if it is one.
    pub fn of(format: kiln_ir::attrs::Format) -> Option<Fp8Format> {
        match format {
            kiln_ir::attrs::Format::E4m3 => Some(Fp8Format::E4m3),
            kiln_ir::attrs::Format::E5m2 => Some(Fp8Format::E5m2),
            _ => None,
        }
    }
}

/// The code every NaN input converts to, in both formats.
pub const NAN_CODE: u8 = 0x7F;

const fn decode_code(format: Fp8Format, code: u8) -> f32 {
    let (m, bias) = (format.mantissa_bits(), format.bias());
    let exp_mask = (1u32 << format.exponent_bits()) - 1;
    let magnitude = (code & 0x7F) as u32;
    let (e, f) = (magnitude >> m, magnitude & ((1 << m) - 1));
    let value = if e == exp_mask && matches!(format, Fp8Format::E5m2) {
        if f == 0 {
            f32::INFINITY
        } else {
            f32::NAN
        }
    } else if e == exp_mask && f == (1 << m) - 1 {
        // E4M3 spends only S.1111.111 on NaN; the rest of its top binade is finite.
        f32::NAN
    } else if e == 0 {
        // Subnormal: f · 2^(1 − bias − m).
        f as f32 * pow2(1 - bias - m as i32)
    } else {
        ((1 << m) + f) as f32 * pow2(e as i32 - bias - m as i32)
    };
    if code & 0x80 != 0 {
        -value
    } else {
        value
    }
}

/// `2^e` for the exponents an FP8 format reaches (normal in f32).
const fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

const fn table(format: Fp8Format) -> [f32; 256] {
    let mut t = [0.0; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = decode_code(format, c as u8);
        c += 1;
    }
    t
}

static E4M3_VALUES: [f32; 256] = table(Fp8Format::E4m3);
static E5M2_VALUES: [f32; 256] = table(Fp8Format::E5m2);

impl Fp8Format {
    pub const ALL: [Fp8Format; 2] = [Fp8Format::E4m3, Fp8Format::E5m2];

    pub const fn name(self) -> &'static str {
        match self {
            Fp8Format::E4m3 => "e4m3",
            Fp8Format::E5m2 => "e5m2",
        }
    }

    pub const fn exponent_bits(self) -> u32 {
        match self {
            Fp8Format::E4m3 => 4,
            Fp8Format::E5m2 => 5,
        }
    }

    /// Explicit mantissa (fraction) bits.
    pub const fn mantissa_bits(self) -> u32 {
        match self {
            Fp8Format::E4m3 => 3,
            Fp8Format::E5m2 => 2,
        }
    }

    pub const fn bias(self) -> i32 {
        match self {
            Fp8Format::E4m3 => 7,
            Fp8Format::E5m2 => 15,
        }
    }

    /// The largest finite code (positive sign): `0x7E` (448) or `0x7B` (57344).
    pub const fn max_code(self) -> u8 {
        match self {
            Fp8Format::E4m3 => 0x7E,
            Fp8Format::E5m2 => 0x7B,
        }
    }

    /// The largest finite value: 448 or 57344.
    pub const fn max(self) -> f32 {
        decode_code(self, self.max_code())
    }

    /// The smallest positive normal value: 2⁻⁶ or 2⁻¹⁴.
    pub const fn min_normal(self) -> f32 {
        pow2(1 - self.bias())
    }

    /// The smallest positive subnormal value: 2⁻⁹ or 2⁻¹⁶.
    pub const fn min_subnormal(self) -> f32 {
        pow2(1 - self.bias() - self.mantissa_bits() as i32)
    }

    /// The f32 value of every code, indexed by code.
    pub fn values(self) -> &'static [f32; 256] {
        match self {
            Fp8Format::E4m3 => &E4M3_VALUES,
            Fp8Format::E5m2 => &E5M2_VALUES,
        }
    }

    /// The value of a code (exact).
    #[inline]
    pub fn decode(self, code: u8) -> f32 {
        self.values()[code as usize]
    }

    /// The f32 bit pattern of the smallest magnitude that saturates: beyond the midpoint
    /// between the largest finite value and the next power of the format's grid, or at it
    /// when ties-to-even would round up (E5M2's largest mantissa is odd, E4M3's is even).
    const fn saturation_bits(self) -> u32 {
        let max = self.max().to_bits();
        // Half an ulp of the largest finite value, in f32 bits: the bit just below the
        // format's last mantissa bit.
        let midpoint = max + (1 << (23 - self.mantissa_bits() - 1));
        if self.max_code() & 1 == 1 {
            midpoint
        } else {
            midpoint + 1
        }
    }

    /// Converts with round-to-nearest-even and saturation to the largest finite value, as
    /// `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, format)`.
    #[inline]
    pub fn encode(self, x: f32) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        let abs = bits & 0x7FFF_FFFF;
        if abs > 0x7F80_0000 {
            return NAN_CODE;
        }
        if abs >= self.saturation_bits() {
            return sign | self.max_code();
        }
        let m = self.mantissa_bits();
        let magnitude = if abs >= self.min_normal().to_bits() {
            // Round the f32 fraction to `m` bits, ties to even, by adding just under half an
            // ulp plus the ulp's parity; a carry moves into the exponent as it should. Then
            // rebias the exponent field from f32's 127 to the format's bias.
            let shift = 23 - m;
            let rounded = abs + ((1 << (shift - 1)) - 1) + ((abs >> shift) & 1);
            (rounded >> shift) - (((127 - self.bias()) as u32) << m)
        } else {
            // Subnormal (or zero): the count of the smallest subnormal step, rounded to
            // nearest even. Scaling by a power of two is exact, and a result of 2^m is the
            // smallest normal code, which is what that value encodes to.
            // Adding and subtracting 2^23 rounds a value below 2^22 to an integer, to
            // nearest even, in f32's default rounding (no libm call).
            let steps = f32::from_bits(abs) / self.min_subnormal();
            const SHIFTER: f32 = 8_388_608.0;
            ((steps + SHIFTER) - SHIFTER) as u32
        };
        sign | magnitude as u8
    }

    /// `decode(encode(x))`: `x` rounded onto the format's grid.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        self.decode(self.encode(x))
    }
}

impl std::fmt::Display for Fp8Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference conversion, written differently from `encode`: pick the nearest finite
    /// code by comparing exact f64 distances to every code's value (ties to the even code),
    /// then apply the saturation and NaN rules.
    fn nearest(format: Fp8Format, x: f32) -> u8 {
        if x.is_nan() {
            return NAN_CODE;
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = f64::from(x.abs());
        let max = f64::from(format.max());
        // Beyond the largest value, the next grid point would be max + ulp(max).
        let ulp_max =
            f64::from(format.decode(format.max_code()) - format.decode(format.max_code() - 1));
        let over = a - max;
        if over > ulp_max / 2.0 || (over == ulp_max / 2.0 && format.max_code() & 1 == 1) {
            return sign | format.max_code();
        }
        let mut best = 0u8;
        for c in 0..=format.max_code() {
            let (d, db) = (
                (f64::from(format.decode(c)) - a).abs(),
                (f64::from(format.decode(best)) - a).abs(),
            );
            if d < db || (d == db && c & 1 == 0 && best & 1 == 1) {
                best = c;
            }
        }
        sign | best
    }

    #[test]
    fn the_formats_have_their_published_constants() {
        assert_eq!(Fp8Format::E4m3.max(), 448.0);
        assert_eq!(Fp8Format::E5m2.max(), 57344.0);
        assert_eq!(Fp8Format::E4m3.min_normal(), 2f32.powi(-6));
        assert_eq!(Fp8Format::E5m2.min_normal(), 2f32.powi(-14));
        assert_eq!(Fp8Format::E4m3.min_subnormal(), 2f32.powi(-9));
        assert_eq!(Fp8Format::E5m2.min_subnormal(), 2f32.powi(-16));
        let e4 = Fp8Format::E4m3.values();
        assert_eq!(
            e4.iter().filter(|v| v.is_nan()).count(),
            2,
            "S.1111.111 only"
        );
        assert!(
            e4.iter().all(|v| !v.is_infinite()),
            "E4M3 has no infinities"
        );
        let e5 = Fp8Format::E5m2.values();
        assert_eq!(e5.iter().filter(|v| v.is_nan()).count(), 6);
        assert_eq!(e5[0x7C], f32::INFINITY);
        assert_eq!(e5[0xFC], f32::NEG_INFINITY);
        // A few codes by hand: 1.0, the smallest subnormal, −1.5, E5M2's 0.75.
        assert_eq!(e4[0x38], 1.0);
        assert_eq!(e4[0x01], 2f32.powi(-9));
        assert_eq!(e4[0xBC], -1.5);
        assert_eq!(e5[0x3A], 0.75);
    }

    #[test]
    fn every_finite_code_encodes_back_to_itself() {
        for format in Fp8Format::ALL {
            for code in 0..=255u8 {
                let v = format.decode(code);
                if v.is_finite() {
                    assert_eq!(format.encode(v), code, "{format} code {code:#04x} = {v}");
                }
            }
        }
    }

    #[test]
    fn midpoints_round_to_the_even_code_and_their_neighbours_to_the_nearer() {
        for format in Fp8Format::ALL {
            for code in 0..format.max_code() {
                let (lo, hi) = (format.decode(code), format.decode(code + 1));
                let mid = (f64::from(lo) + f64::from(hi)) / 2.0;
                let mid32 = mid as f32;
                assert_eq!(f64::from(mid32), mid, "midpoints are f32 values");
                let even = if code & 1 == 0 { code } else { code + 1 };
                for sign in [0u8, 0x80] {
                    let s = if sign == 0 { 1.0 } else { -1.0 };
                    assert_eq!(format.encode(s * mid32), sign | even, "{format} tie {mid}");
                    let below = f32::from_bits(mid32.to_bits() - 1);
                    let above = f32::from_bits(mid32.to_bits() + 1);
                    if mid32 != 0.0 {
                        assert_eq!(format.encode(s * below), sign | code, "{format} {below}");
                    }
                    assert_eq!(
                        format.encode(s * above),
                        sign | (code + 1),
                        "{format} {above}"
                    );
                }
            }
        }
    }

    #[test]
    fn saturation_nan_zero_and_underflow_follow_satfinite() {
        for format in Fp8Format::ALL {
            let max = format.max_code();
            for x in [f32::INFINITY, f32::MAX, 1e30, format.max() * 2.0] {
                assert_eq!(format.encode(x), max, "{format} {x}");
                assert_eq!(format.encode(-x), 0x80 | max, "{format} -{x}");
            }
            for nan in [f32::NAN, -f32::NAN, f32::from_bits(0x7F80_0001)] {
                assert_eq!(format.encode(nan), NAN_CODE);
            }
            assert_eq!(format.encode(0.0), 0);
            assert_eq!(format.encode(-0.0), 0x80);
            let half_min = format.min_subnormal() / 2.0;
            assert_eq!(format.encode(half_min), 0, "the tie with zero goes to zero");
            assert_eq!(format.encode(-half_min), 0x80);
            assert_eq!(format.encode(f32::from_bits(half_min.to_bits() + 1)), 1);
            assert_eq!(
                format.encode(f32::from_bits(1)),
                0,
                "f32 subnormals underflow"
            );
        }
        // E4M3: 464 is the tie between 448 and 480 and goes to 448 (even); above it
        // saturates. E5M2: 61440 is the tie between 57344 and 65536 and saturates.
        assert_eq!(Fp8Format::E4m3.encode(464.0), 0x7E);
        assert_eq!(Fp8Format::E4m3.encode(464.0001), 0x7E);
        assert_eq!(Fp8Format::E5m2.encode(61439.996), 0x7B);
        assert_eq!(Fp8Format::E5m2.encode(61440.0), 0x7B);
    }

    #[test]
    fn encode_matches_the_nearest_code_on_a_sweep_of_f32_bit_patterns() {
        // Every 4099th bit pattern (a prime stride, so all fraction positions are visited)
        // plus every pattern within 64 of each code's value and each midpoint.
        for format in Fp8Format::ALL {
            let mut probes: Vec<u32> = (0..=u32::MAX).step_by(4099 * 16).collect();
            for code in 0..=format.max_code() {
                let v = format.decode(code).to_bits();
                probes.extend(v.saturating_sub(64)..v.saturating_add(64));
            }
            for bits in probes {
                for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                    assert_eq!(
                        format.encode(x),
                        nearest(format, x),
                        "{format} {x:e} ({bits:#x})"
                    );
                }
            }
        }
    }
}
