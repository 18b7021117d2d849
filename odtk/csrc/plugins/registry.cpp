// Registers the odtk plugin creators so TensorRT finds them by name when it deserialises a plan.
#include "decode_plugin.h"
#include "nms_plugin.h"

namespace odtk {

bool register_plugins() {
  // function-local statics: created once, live as long as the process (TensorRT keeps pointers to them)
  static PluginCreator<DecodePlugin> decode_creator;
  static PluginCreator<NMSPlugin> nms_creator;
  static const bool registered = [] {
    auto* registry = getPluginRegistry();
    bool ok = registry->getCreator(DecodePlugin::kName, kPluginVersion, kPluginNamespace) != nullptr ||
              registry->registerCreator(decode_creator, kPluginNamespace);
    ok = (registry->getCreator(NMSPlugin::kName, kPluginVersion, kPluginNamespace) != nullptr ||
          registry->registerCreator(nms_creator, kPluginNamespace)) && ok;
    return ok;
  }();
  return registered;
}

}  // namespace odtk
