// Rotated-box geometry of the rotated IoU and NMS kernels: the intersection of two rotated rectangles as a
// convex polygon (Sutherland-Hodgman clipping, then the shoelace formula), in float32. The functions compile for
// the host too, with the same operations (round-to-nearest products on the device: no FMA contraction), so a
// host build gives the kernels' numbers.
//
// A box is (x1, y1, x2, y2, theta): the corners of the box before rotation and the angle, the box turned about its
// centre as ODTK's rotate_boxes turns it (odtk/rotated.py): a corner at offset (dx, dy) from the centre goes to
// (cos t * dx + sin t * dy, -sin t * dx + cos t * dy). In image coordinates (y down) a positive theta turns the
// box counter-clockwise on screen: with t = pi/2 the right-hand corner (1, 0) goes up to (0, -1).
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define ODTK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ODTK_HOST_DEVICE inline
#endif

namespace odtk {
namespace rotated {

// Products and sums rounded once each, so host and device agree (nvcc would otherwise fuse them into FMAs).
ODTK_HOST_DEVICE float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ODTK_HOST_DEVICE float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ODTK_HOST_DEVICE float sub(float a, float b) { return add(a, -b); }

struct Point {
  float x, y;
};

// a x b of the vectors from o to a and o to b: > 0 when b lies left of o -> a (counter-clockwise in y-up terms)
ODTK_HOST_DEVICE float cross(Point o, Point a, Point b) {
  return sub(mul(sub(a.x, o.x), sub(b.y, o.y)), mul(sub(a.y, o.y), sub(b.x, o.x)));
}

// A box ready to intersect: its centre, its corners relative to the centre (in the order (x1, y1), (x2, y1),
// (x2, y2), (x1, y2) before rotation: positive orientation, interior on the left of each edge), its area and the
// radius of its circumscribed circle. A box of zero (or negative) width or height has area 0.
struct Quad {
  Point centre;
  Point corner[4];
  float area;
  float radius;
};

ODTK_HOST_DEVICE Quad make_quad(const float* box) {
  Quad q;
  const float w = sub(box[2], box[0]), h = sub(box[3], box[1]);
  q.centre = Point{mul(0.5f, add(box[0], box[2])), mul(0.5f, add(box[1], box[3]))};
  q.area = w > 0.f && h > 0.f ? mul(w, h) : 0.f;
  q.radius = mul(0.5f, sqrtf(add(mul(w, w), mul(h, h))));
  const float s = sinf(box[4]), c = cosf(box[4]);
  const float hw = mul(0.5f, w), hh = mul(0.5f, h);
  const float dx[4] = {-hw, hw, hw, -hw}, dy[4] = {-hh, -hh, hh, hh};
  for (int k = 0; k < 4; ++k)
    q.corner[k] = Point{add(mul(c, dx[k]), mul(s, dy[k])), sub(mul(c, dy[k]), mul(s, dx[k]))};
  return q;
}

// At most 8 vertices: a convex quadrilateral clipped by 4 half-planes gains at most one vertex per clip.
constexpr int kMaxVertices = 8;

// Keeps the part of polygon `in` (n vertices) on the left of the line p -> q, into `out`; returns its vertex count.
// Vertices on the line count as inside; an edge gets a new vertex only where it strictly crosses the line.
ODTK_HOST_DEVICE int clip(const Point* in, int n, Point p, Point q, Point* out) {
  int m = 0;
  for (int i = 0; i < n; ++i) {
    const Point a = in[i], b = in[(i + 1) % n];
    const float da = cross(p, q, a), db = cross(p, q, b);
    if (da >= 0.f && m < kMaxVertices) out[m++] = a;
    if (((da > 0.f && db < 0.f) || (da < 0.f && db > 0.f)) && m < kMaxVertices) {
      const float t = da / sub(da, db);
      out[m++] = Point{add(a.x, mul(t, sub(b.x, a.x))), add(a.y, mul(t, sub(b.y, a.y)))};
    }
  }
  return m;
}

// Area of the intersection of two boxes of positive area. Coordinates are taken relative to a's centre, which
// keeps float32's precision for boxes far from the origin.
ODTK_HOST_DEVICE float intersection(const Quad& a, const Quad& b) {
  const Point shift{sub(b.centre.x, a.centre.x), sub(b.centre.y, a.centre.y)};
  Point poly[kMaxVertices], next[kMaxVertices], edge[4];
  for (int k = 0; k < 4; ++k) {
    poly[k] = a.corner[k];
    edge[k] = Point{add(shift.x, b.corner[k].x), add(shift.y, b.corner[k].y)};
  }
  int n = 4;
  for (int k = 0; k < 4 && n > 0; ++k) {
    n = clip(poly, n, edge[k], edge[(k + 1) % 4], next);
    for (int i = 0; i < n; ++i) poly[i] = next[i];
  }
  if (n < 3) return 0.f;
  float twice = 0.f;   // shoelace: twice the signed area, positive for this orientation
  for (int i = 0; i < n; ++i) {
    const Point u = poly[i], v = poly[(i + 1) % n];
    twice = add(twice, sub(mul(u.x, v.y), mul(u.y, v.x)));
  }
  return fmaxf(mul(0.5f, twice), 0.f);
}

// IoU of two boxes; 0 when either has no area or their circumscribed circles are apart (never NaN).
ODTK_HOST_DEVICE float iou(const Quad& a, const Quad& b) {
  if (!(a.area > 0.f && b.area > 0.f)) return 0.f;
  const float dx = sub(b.centre.x, a.centre.x), dy = sub(b.centre.y, a.centre.y), reach = add(a.radius, b.radius);
  if (add(mul(dx, dx), mul(dy, dy)) > mul(reach, reach)) return 0.f;
  // rounding can leave the polygon a hair larger than the smaller box: cap it so that IoU <= 1
  const float inter = fminf(intersection(a, b), fminf(a.area, b.area));
  return inter / sub(add(a.area, b.area), inter);
}

}  // namespace rotated
}  // namespace odtk
